(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll("button[data-filter]"));
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  var current = "all";
  function matches(card) {
    var kind = current === "all" || card.getAttribute("data-media") === current ||
      (current === "error" && card.getAttribute("data-error") === "1");
    var q = search.value.toLowerCase();
    return kind && (!q || card.getAttribute("data-name").indexOf(q) >= 0);
  }
  function apply() {
    var n = 0;
    cards.forEach(function (card) { card.hidden = !matches(card); if (!card.hidden) { n += 1; } });
    shown.textContent = n + " of " + cards.length + " shown";
  }
  buttons.forEach(function (b) {
    b.addEventListener("click", function () {
      current = b.getAttribute("data-filter");
      buttons.forEach(function (o) { o.classList.toggle("on", o === b); });
      apply();
    });
  });
  search.addEventListener("input", apply);
  apply();
})();

"""parse_output: thinking / answer / boxes from generated GLM-V text (both output styles)."""

import pytest

from glmv.output import parse_output


def test_glm41v_think_then_answer_tags():
    out = parse_output("\n<think>The image shows a cat.\nIt is orange.</think>\n<answer>An orange cat.</answer>")
    assert out.thinking == "The image shows a cat.\nIt is orange."
    assert out.answer == "An orange cat." and out.boxes == [] and out.complete


def test_glm46v_answer_after_think_without_tags():
    out = parse_output("<think>Count the birds: three.</think>\nThere are three birds.<|user|>")
    assert out.thinking == "Count the birds: three." and out.answer == "There are three birds."


def test_thinking_disabled_empty_think_block():
    out = parse_output("<think></think>\nA red bus.")
    assert out.thinking == "" and out.answer == "A red bus."


def test_no_tags_is_all_answer():
    out = parse_output("Just a caption.<|endoftext|>")
    assert out.thinking == "" and out.answer == "Just a caption." and out.complete


def test_cut_off_inside_think_keeps_partial_thinking():
    out = parse_output("<think>First I look at the left side, then")
    assert out.thinking == "First I look at the left side, then"
    assert out.answer == "" and not out.complete


def test_cut_off_inside_answer():
    out = parse_output("<think>ok</think><answer>The text reads: HELLO WOR")
    assert out.answer == "The text reads: HELLO WOR" and not out.complete


def test_prompt_opened_think_leaves_only_closing_tag():
    out = parse_output("reasoning here</think><answer>yes</answer>")
    assert out.thinking == "reasoning here" and out.answer == "yes"


@pytest.mark.parametrize("inner,expected", [
    ("[[100,200,300,400]]", [(100, 200, 300, 400)]),
    ("[100, 200, 300, 400]", [(100, 200, 300, 400)]),
    ("(12,34,56,78)", [(12, 34, 56, 78)]),
    ("<5 6 7 8>", [(5, 6, 7, 8)]),
    ("[[1,2,3,4],[5,6,7,8]]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    ("[[10.5, 20, 30.25, 40]]", [(10.5, 20, 30.25, 40)]),
    ("[-5,-10,+2000,3000]", [(-5, -10, 2000, 3000)]),
    ("[100,200,300,400].", [(100, 200, 300, 400)]), ("[100.,200,300,.5]", [(100, 200, 300, 0.5)]),
    # text, not coordinates: numbers glued by signs or dots, a count that is not a multiple of 4, signs alone
    ("[1-2-3-4]", []), ("[1..2,3,4]", []), ("[1.2.3,4,5,6,7]", []), ("[1,2,3]", []), ("[-,-,-,-]", []),
    ("C", []), ("", []),
])
def test_box_bracket_styles(inner, expected):
    out = parse_output(f"<think>find it</think><answer>The dog is at <|begin_of_box|>{inner}<|end_of_box|>.</answer>")
    assert out.boxes == expected
    assert out.answer == f"The dog is at {inner}."


def test_boxes_in_46v_style_answer_and_several_markers():
    text = ("<think>two dogs</think>Dog A <|begin_of_box|>[1,2,3,4]<|end_of_box|> and dog B "
            "<|begin_of_box|>[[5,6,7,8]]<|end_of_box|>")
    out = parse_output(text)
    assert out.boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert "<|begin_of_box|>" not in out.answer and out.answer.startswith("Dog A [1,2,3,4]")


@pytest.mark.parametrize("inner", ["C", "42", "A cat", "[1,2,3]", "x=1,y=2"])
def test_box_markers_around_a_non_coordinate_answer(inner):
    out = parse_output(f"<think>The options...</think><answer><|begin_of_box|>{inner}<|end_of_box|></answer>")
    assert out.answer == inner and out.boxes == []


def test_boxes_in_thinking_are_not_reported():
    out = parse_output("<think>maybe <|begin_of_box|>[1,1,2,2]<|end_of_box|>?</think><answer>none</answer>")
    assert out.boxes == [] and out.answer == "none" and "[1,1,2,2]" in out.thinking


def test_unclosed_box_marker_at_cut_off():
    out = parse_output("<think>x</think>Here: <|begin_of_box|>[1,2,3,4]")
    assert out.boxes == [(1, 2, 3, 4)] and out.answer == "Here: [1,2,3,4]"


def test_trailing_end_of_turn_tokens_are_stripped_in_linear_time():
    """A model stuck emitting whitespace must not stall the parse: the old anchored regex backtracked from every
    start of a whitespace run (80k spaces: 6 s)."""
    import time

    out = parse_output("<think>t</think><answer>a</answer> <|user|>\n <|endoftext|>  ")
    assert (out.thinking, out.answer, out.complete) == ("t", "a", True)
    assert parse_output("caption <|observation|>").answer == "caption"
    assert parse_output("keeps <|user|> inside the text").answer == "keeps <|user|> inside the text"
    started = time.perf_counter()
    out = parse_output("<think>ok</think>answer" + " " * 400_000 + ".")
    assert time.perf_counter() - started < 0.5
    assert out.answer.startswith("answer") and out.answer.endswith(".")


def test_nested_box_markers_give_the_inner_box_and_leave_no_marker():
    out = parse_output("<answer>See <|begin_of_box|>the dog <|begin_of_box|>[1,2,3,4]<|end_of_box|><|end_of_box|>"
                       " and <|begin_of_box|>(5,6,7,8)<|end_of_box|></answer>")
    assert out.boxes == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert out.answer == "See the dog [1,2,3,4] and (5,6,7,8)" and out.complete
    cut = parse_output("<|begin_of_box|>a <|begin_of_box|>[1,2,3,4]")   # both cut off by the token limit
    assert cut.boxes == [(1, 2, 3, 4)] and cut.answer == "a [1,2,3,4]"


def test_answer_written_before_a_late_think_block_is_kept():
    out = parse_output("<answer>A cat.</answer><think>double-check</think>")
    assert (out.thinking, out.answer, out.complete) == ("double-check", "A cat.", True)
    out = parse_output("A cat. <think>more thoughts")   # cut off inside the late block
    assert (out.thinking, out.answer, out.complete) == ("more thoughts", "A cat.", False)


def test_hostile_boxes_parse_in_linear_time():
    """A long digit run that is not a number, deep nesting, many boxes: 0.35 s together here, where quadratic
    parsing took 5.8 s for 40,000 digits (minutes for these). The bound leaves room for a slow or busy machine: at
    1 s it failed once in CI on a machine running everything ~1.3x slower that day."""
    import time

    started = time.perf_counter()
    assert parse_output("<|begin_of_box|>" + "1" * 200_000 + "x 2 3 4<|end_of_box|>").boxes == []
    assert len(parse_output("<|begin_of_box|>" * 50_000 + "[1,2,3,4]" + "<|end_of_box|>" * 50_000).boxes) == 1
    assert len(parse_output("<|begin_of_box|>[1,2,3,4]<|end_of_box|>" * 50_000).boxes) == 50_000
    assert time.perf_counter() - started < 5.0

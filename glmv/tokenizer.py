"""The checkpoint's tokenizer: `tokenizer.json` run by the `tokenizers` library, settings from tokenizer_config.json.

Behaves like transformers' fast tokenizer for what GLM-V needs: encode (special tokens written in the text, such
as `<|image|>`, map to their ids), left padding with the pad id, decode with or without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import AddedToken, Tokenizer

from glmv.errors import ProcessorConfigError

# The names transformers exposes as `special_tokens_map` (and passes to chat templates).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def read_config_json(path: Path) -> dict | None:
    """A processor-side settings file (tokenizer, pre-processor, template): its JSON object, None if absent."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProcessorConfigError(f"{path}: invalid JSON ({exc})") from None
    return config_object(config, str(path))


def config_object(config, where: str) -> dict | None:
    if config is not None and not isinstance(config, dict):
        raise ProcessorConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    return config


class GlmTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        self.backend = tokenizer
        self.config = dict(config or {})
        # make sure every token the config declares exists with its special flag (as transformers does on load)
        declared = self.config.get("added_tokens_decoder") or {}
        for _, spec in sorted(declared.items(), key=lambda kv: int(kv[0])):
            content = spec.get("content")
            if content and tokenizer.token_to_id(content) is None:
                token = AddedToken(content, special=bool(spec.get("special")), normalized=bool(spec.get("normalized")),
                                   lstrip=bool(spec.get("lstrip")), rstrip=bool(spec.get("rstrip")),
                                   single_word=bool(spec.get("single_word")))
                (tokenizer.add_special_tokens if spec.get("special") else tokenizer.add_tokens)([token])
        self.special_tokens_map = {
            name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(self.config.get(name))) is not None
        }
        self.padding_side = self.config.get("padding_side", "left")
        if self.padding_side not in ("left", "right"):
            raise ProcessorConfigError(f"tokenizer padding_side must be 'left' or 'right', got {self.padding_side!r}")
        self.pad_token = self.special_tokens_map.get("pad_token", self.special_tokens_map.get("eos_token"))
        self.pad_token_id = self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None
        self.bos_token = self.special_tokens_map.get("bos_token")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GlmTokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ProcessorConfigError(f"{path}: no tokenizer.json (the tokenizers-library file is required)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise ProcessorConfigError(f"{file}: cannot load ({exc})") from None
        return cls(backend, read_config_json(path / "tokenizer_config.json") or {})

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> dict:
        """Encode a batch; pads on `padding_side` with the pad id. return_tensors "pt" gives int64 tensors."""
        texts = [text] if isinstance(text, str) else list(text)
        ids = [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if padding in (True, "longest", "max_length"):
            target = max(map(len, ids), default=0)
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                target = max(target, max_length)
            ids, mask = self.pad(ids, target)
        elif padding in (False, None, "do_not_pad"):
            mask = [[1] * len(row) for row in ids]
        else:
            raise ValueError(f"padding must be True/False/'longest'/'max_length', got {padding!r}")
        out = {"input_ids": ids, "attention_mask": mask}
        if return_tensors == "pt":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("sequences have different lengths: pass padding=True to batch them into a tensor")
            out = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return out

    def pad(self, ids: list[list[int]], length: int) -> tuple[list[list[int]], list[list[int]]]:
        if self.pad_token_id is None:
            raise ProcessorConfigError("the tokenizer has no pad token (tokenizer_config.json pad_token/eos_token)")
        padded, mask = [], []
        for row in ids:
            fill = length - len(row)
            if self.padding_side == "left":
                padded.append([self.pad_token_id] * fill + row)
                mask.append([0] * fill + [1] * len(row))
            else:
                padded.append(row + [self.pad_token_id] * fill)
                mask.append([1] * len(row) + [0] * fill)
        return padded, mask

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        rows = sequences.tolist() if hasattr(sequences, "tolist") else [[int(i) for i in r] for r in sequences]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

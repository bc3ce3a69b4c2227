"""A byte-level BPE trained on the tasks' own text, with the V4 special tokens as single ids.

Why train our own: no model hub is reachable, and a small vocabulary fitted to the task text keeps the tiny
policy's sequences short on CPU. Byte-level means every string round-trips exactly (decode(encode(s)) == s).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.encoding import BOS, EOS, SPECIAL_TOKENS

PAD = "<｜pad｜>"


class V4Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the ids the trainer needs."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.bos_id = self._id(BOS)
        self.eos_id = self._id(EOS)
        self.pad_id = self._id(PAD)

    def _id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer lacks special token {token!r}: retrain it with trainer.tokenizer.train")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: Path) -> V4Tokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def as_hf(self):  # -> transformers.PreTrainedTokenizerFast
        """The same tokenizer as a transformers object (for TRL and `generate`)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def train(texts: Iterable[str], vocab_size: int) -> V4Tokenizer:
    """Fit the BPE on `texts`; the special tokens are never split and never merged into others."""
    tok = Tokenizer(models.BPE())
    # Digits stay single tokens (copying a number is then the same task in every context); everything else may
    # merge across word boundaries, so the long, repeated V4 system prompt and DSML tags cost few tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [*SPECIAL_TOKENS, PAD]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return V4Tokenizer(tok)

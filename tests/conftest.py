"""Shared pytest fixtures."""

import pytest

from tests.tiny import make_tiny_tokenizer


@pytest.fixture
def tiny_tokenizer():
    """A fresh byte-level BPE (vocab 400) with ChatML special tokens, EOS <|im_end|> and no chat template."""
    return make_tiny_tokenizer(vocab_size=400)

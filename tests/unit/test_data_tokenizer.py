"""Tokenizers: byte round trips, local Hugging Face tokenizer files, eos lookup, errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsetron.train.data import ByteTokenizer, DataError, HFTokenizer, build_tokenizer, token_dtype


def random_text(rng: random.Random, n: int) -> str:
    """Random code points from all planes, surrogates excluded (they cannot be UTF-8)."""
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])
        out.append(chr(cp))
    return "".join(out)


def train_bpe(folder, eos: str = "<|endoftext|>", specials: tuple[str, ...] = ()) -> str:
    """A small byte-level BPE trained on random words; saved to folder/tokenizer.json."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [s for s in (eos, *specials) if s]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_byte_roundtrip_random_unicode():
    rng = random.Random()
    tok = ByteTokenizer()
    for _ in range(20):
        text = random_text(rng, rng.randint(0, 200))
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id]) == text  # eos is framing, not text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_byte_encode_documents_matches_per_document_encode():
    rng = random.Random()
    tok = ByteTokenizer()
    texts = [random_text(rng, rng.randint(0, 50)) for _ in range(30)]
    tokens, starts = tok.encode_documents(texts)
    expected = [t for text in texts for t in [*tok.encode(text), tok.eos_id]]
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    lengths = [len(t.encode("utf-8")) + 1 for t in texts]
    assert starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()


def test_hf_tokenizer_from_file_and_folder(tmp_path):
    path = train_bpe(tmp_path)
    for spec in (path, str(tmp_path)):
        tok = build_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        assert tok.eos_id == Tokenizer.from_file(path).token_to_id("<|endoftext|>")
        assert tok.vocab_size == Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    rng = random.Random()
    texts = ["".join(rng.choice("abcdefgh ,.XYZ\n") for _ in range(rng.randint(1, 80))) for _ in range(12)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text
    tokens, starts = tok.encode_documents(texts)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [t for text in texts for t in [*tok.encode(text), tok.eos_id]]
    assert (tokens[starts[1:] - 1] == tok.eos_id).all()


@pytest.mark.parametrize("eos", ["</s>", "<eos>"])
def test_hf_eos_found_by_common_name(tmp_path, eos):
    tok = HFTokenizer(train_bpe(tmp_path, eos=eos))
    assert tok.eos_token == eos
    assert tok.eos_id == Tokenizer.from_file(tok.path).token_to_id(eos)


def test_hf_eos_configured(tmp_path):
    path = train_bpe(tmp_path, eos="</s>", specials=("<|im_end|>",))
    im_end = Tokenizer.from_file(path).token_to_id("<|im_end|>")
    assert HFTokenizer(path, eos_token="<|im_end|>").eos_id == im_end
    # transformers' tokenizer_config.json next to the file names it too (AddedToken as a dict)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert HFTokenizer(str(tmp_path)).eos_id == im_end


def test_hf_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(DataError, match=str(missing)):
        build_tokenizer(str(missing))
    with pytest.raises(DataError, match=str(tmp_path / "tokenizer.json")):
        build_tokenizer(str(tmp_path))  # a folder without tokenizer.json
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(DataError, match=str(broken)):
        build_tokenizer(str(broken))
    no_eos = tmp_path / "noeos"
    no_eos.mkdir()
    with pytest.raises(DataError, match=r"no end-of-document token.*\[EOS\]"):
        build_tokenizer(train_bpe(no_eos, eos=""))
    with pytest.raises(DataError, match="<missing>"):
        HFTokenizer(train_bpe(no_eos), eos_token="<missing>")


def test_token_dtype():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    assert token_dtype(200_000) == np.int32

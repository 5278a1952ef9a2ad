"""Offline CLIP BPE tokenizer.

open_clip ships the CLIP BPE merges (``bpe_simple_vocab_16e6.txt.gz``) inside its package. From it we
rebuild the exact 49,408-entry CLIP vocabulary (256 byte characters, the same with ``</w>``, one entry
per merge, then the two special tokens) so that a transformers ``CLIPTokenizer`` gives the same ids as
open_clip and as the tokenizer of Stable Diffusion checkpoints, without any download.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

NUM_MERGES = 49408 - 256 - 2 - 256  # 48894 merges follow the header line
# The vocabulary and special-token ids every CLIP text tower built offline here must use, so that
# ``build_clip_tokenizer`` ids index it correctly (BOS, and EOS doubling as padding, as in SD).
CLIP_TEXT_TOKEN_IDS = {"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode map (the byte-level alphabet of the BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _open_clip_bpe_path() -> Path:
    import open_clip

    return Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's BPE vocabulary (token -> id) and merge list, rebuilt from open_clip's bundled file."""
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary, built offline.

    Stable Diffusion 1.x pads with ``<|endoftext|>`` (id 49407), which is the default here.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, pad_token=pad_token)

"""The offline Kosmos-2 processor: tokenizer + image processor, built without the hub.

microsoft/kosmos-2-patch14-224 ships its processor; the tiny default has none, so one is built from the
instructions themselves (checked on transformers 5.24; tests/test_model.py saves and reloads one): a ``tokenizers``
Unigram model (XLM-R's model type, so ``XLMRobertaTokenizerFast`` saves *and* reloads it; a BPE model
saves but does not reload through that class) with XLM-R's special-token ids (<s>=0, <pad>=1, </s>=2,
<unk>=3, matching ``Kosmos2TextConfig``'s bos/pad/eos defaults), plus a ``CLIPImageProcessor`` with
CLIP's mean/std. ``Kosmos2Processor`` adds its 11 tag tokens and 1024 patch-index tokens to the
tokenizer, so the text model's vocabulary must be ``len(processor.tokenizer)``, not the Unigram size.

Images are resized and normalised in torch (``vlaops.data.transforms``); the processor is used for text.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoProcessor, Kosmos2Processor, XLMRobertaTokenizerFast

from vlaops.data.transforms import CLIP_MEAN, CLIP_STD
from vlaops.errors import VlaopsError
from vlaops.model.backbone import check_pretrained_dir

# XLM-R's order, so the ids equal Kosmos2TextConfig's bos_token_id=0, pad_token_id=1, eos_token_id=2.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _clip_image_processor(size: int):
    # Without torchvision the CLIPImageProcessor alias falls back to the PIL class with a warning;
    # name the PIL class directly. Either saves as a processor_config AutoProcessor reloads.
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    return ImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def _unigram_model(texts: list[str], vocab_size: int) -> models.Unigram:
    """A word-level Unigram model with character fallback, from word counts.

    ``tokenizers``' UnigramTrainer degenerates to single characters on a corpus of a few dozen short
    instructions (checked on tokenizers 0.23: "open the drawer" became 14 pieces), which would
    truncate instructions at max_text_len. Scoring the pieces directly keeps the same model type
    (what XLMRobertaTokenizerFast saves and reloads): every seen word is one piece, scored by its
    log frequency; every seen character (the word-start mark too) is a fallback piece scored below
    any word, so Viterbi prefers whole words and still spells out unseen ones.
    """
    pretok = pre_tokenizers.Metaspace()
    norm = normalizers.NFKC()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pretok.pre_tokenize_str(norm.normalize_str(text)))
    chars: Counter[str] = Counter()
    for w, n in words.items():
        for ch in w:  # includes the word-start mark "\u2581"
            chars[ch] += n
    char_pieces = sorted(chars)
    budget = max(0, vocab_size - len(SPECIAL_TOKENS) - len(char_pieces))
    # most frequent first, ties alphabetical: the vocabulary depends on the texts only
    kept = sorted(((w, n) for w, n in words.items() if len(w) > 1 and w not in chars), key=lambda x: (-x[1], x[0]))[
        :budget
    ]
    total = float(sum(words.values()))
    word_scores = [(w, math.log(n / total)) for w, n in kept]
    floor = min((sc for _, sc in word_scores), default=0.0) - 10.0  # any character spelling loses to a word
    char_scores = [(c, floor - 1.0 / (1 + chars[c])) for c in char_pieces]
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + word_scores + char_scores
    return models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False)


def build_offline_processor(instructions: list[str], vocab_size: int = 1000, image_size: int = 224) -> Kosmos2Processor:
    """A Unigram tokenizer over ``instructions`` wrapped with a CLIP image processor.

    At most ``vocab_size`` pieces before Kosmos-2's added tokens: the special tokens, every character
    seen, and the most frequent words; unseen words are spelled from characters, unseen characters
    become <unk>.
    """
    texts = [t for t in instructions if t and t.strip()]
    if not texts:
        raise VlaopsError("build_offline_processor: no non-empty instruction strings to train the tokenizer on")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    tok = Tokenizer(_unigram_model(texts, vocab_size))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=2048,
    )
    return Kosmos2Processor(_clip_image_processor(image_size), tokenizer)


def load_processor(path: str | os.PathLike[str]):
    """Load a processor saved with ``save_pretrained`` (ours, or the one in a Kosmos-2 checkpoint dir)."""
    path = Path(path)
    if not path.is_dir():
        raise VlaopsError(f"{path}: processor directory not found")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise VlaopsError(f"{path}: no tokenizer.json or tokenizer_config.json; not a saved processor")
    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise VlaopsError(f"{path}: cannot load the processor ({exc})") from exc


def make_processor(cfg, instructions: list[str]):
    """The processor a run uses: the checkpoint's own with ``cfg.pretrained_dir``, else one built from the
    training instructions (``cfg.vocab_size``, ``cfg.image_size``). ``cfg`` is a ``ModelConfig``."""
    if cfg.pretrained_dir is not None:
        return load_processor(check_pretrained_dir(cfg.pretrained_dir))
    return build_offline_processor(instructions, vocab_size=cfg.vocab_size, image_size=cfg.image_size)

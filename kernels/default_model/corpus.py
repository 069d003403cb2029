"""The default model's text and tokenizer: the Python standard library's sources, cut and BPE-merged.

Kept apart from the training loop (``train.py``): what the model reads, and how it is tokenized,
are what decide whether its output looks like Python.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Order fixes the ids: <s>=0, </s>=1, <pad>=2.
SPECIAL_TOKENS = (BOS, EOS, PAD)

# site-packages differs from machine to machine (and would leak third-party code into the corpus);
# test suites are full of deliberately odd code (bad syntax, strange encodings) that teaches little;
# encodings/ is ~100 near-identical codec tables that a tiny model memorises first and then recites
# for every prompt.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"})
# How text is cut into chunks before BPE merges (merges never cross chunks). Unlike GPT-2's split,
# a word or punctuation run keeps the single space *after* it ("def ", "class ", "= "), so prompts
# that end in a space, the usual way to ask for code ("def ", "return "), tokenize exactly as the
# same text did in training instead of leaving an orphan space token the model has rarely seen.
# A newline keeps the indentation that follows it, which also makes Python compress well.
PRETOKENIZE_PATTERN = (
    r"[\p{L}_][\p{L}\p{N}_]* ?"  # identifiers and keywords
    r"|\p{N}+ ?"  # numbers
    r"|[^\s\p{L}\p{N}_]+ ?"  # operator / punctuation runs
    r"|\n[ \t]*"  # newline plus the next line's indentation
    r"|\s+"  # any other whitespace
)
# A handful of stdlib files are generated data tables (pydoc topics, unicode maps); skipping very
# large files keeps the corpus looking like hand-written code.
MAX_FILE_BYTES = 200_000


def collect_stdlib_sources(root: Path | None = None) -> list[tuple[str, str]]:
    """Return ``(relative_path, text)`` for the stdlib ``*.py`` files, in sorted order.

    Sorting makes the corpus, and therefore the tokenizer and the data order, the same on every
    run on a given Python version. Files that are not valid UTF-8 are skipped rather than guessed.
    """
    stdlib = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    sources: list[tuple[str, str]] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        raw = path.read_bytes()
        if not raw.strip() or len(raw) > MAX_FILE_BYTES:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        sources.append((rel.as_posix(), text))
    return sources


def train_tokenizer(texts: list[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE tokenizer on the corpus.

    Byte-level means every byte string is encodable, so no ``<unk>`` token is needed. The
    tokenizer prepends ``<s>`` on its own, matching how each training file begins.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            # Only maps bytes to printable symbols; the split above already did the chunking.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, f"{special} should have id {i}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tok


# The model only ever saw Python source: a conversation becomes Python comments and the answer is
# the code that follows (assistant turns are kept as code), so `brigade serve` can chat with it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ message['content'] + '\\n' }}{% else %}{{ '# ' + message['content'].replace('\\n', '\\n# ') + '\\n' }}"
    "{% endif %}{% endfor %}"
)


def wrap_tokenizer(tok, max_positions: int):  # -> transformers.PreTrainedTokenizerFast
    """Wrap the raw tokenizer so ``AutoTokenizer.from_pretrained`` returns it with special tokens set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_stream(tok, texts: list[str]):  # -> torch.Tensor
    """Concatenate ``<s> file </s>`` for every file into one token stream.

    The ``</s>`` at each file end teaches the model where a document stops, while a prompt like
    ``def `` is so far from a file end that greedy decoding does not stop right away.
    """
    import torch

    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)

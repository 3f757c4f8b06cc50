"""TextStream: incremental detokenization with stop strings, checked against a real byte-level BPE tokenizer.

Reference semantics (what every test compares to): after token k the "complete" text is
`decode(ids[:j])` for the largest j <= k whose decode does not end in an unfinished character ('\\ufffd').
The stream stops at the first k whose complete text contains a stop string, and its final text is that
complete text cut before the earliest stop-string occurrence. Released deltas must concatenate to the final
text (so no stop-string character is ever released, not even partially), never contain '\\ufffd', and lag
the complete text by at most `max(len(stop)) - 1` characters.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspec.engine.text import TextStream
from conftest import seeded_normal

REPLACEMENT = "\ufffd"
CORPUS = [
    "hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "你好世界 你好 世界",
    "emoji 😀😀 👍 party 🎉 😀",
    "café naïve résumé über",
    "stop here STOP now. The end.",
] * 20
ALPHABET = list("abcdefghij ABC.,!?\n") + ["é", "ñ", "ü", "你", "好", "世", "日", "本", "語", "😀", "👍", "🎉",
                                         "🚀", "𝄞", "🏽", "€"]


# ---- tokenizers -----------------------------------------------------------------------------------------
def _train_bpe(vocab_size: int = 350):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe():
    return _train_bpe()


@pytest.fixture(scope="module")
def smollm2():
    """The README's default target tokenizer (49,152-token GPT-2 style BPE), read from the GGUF (~5-8 s)."""
    from transformers import AutoTokenizer

    from blockspec.errors import BlockspecError
    from blockspec.hub import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except BlockspecError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---- harness and reference -------------------------------------------------------------------------------
def run_stream(tokenizer, ids: list[int], stop_strings: tuple[str, ...] = ()):
    """Feed tokens as the engine does; returns (deltas after each token, index of the stopping token, stream)."""
    stream = TextStream(tokenizer, stop_strings)
    deltas: list[str] = []
    for k, token in enumerate(ids):
        if stream.add(token):
            deltas.append(stream.release(final=True))
            return deltas, k, stream
        deltas.append(stream.release())
    deltas.append(stream.release(final=True))
    return deltas, None, stream


def complete_texts(tokenizer, ids: list[int]) -> list[str]:
    """complete[k] = the complete-character text after k+1 tokens."""
    out, last = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        if not text.endswith(REPLACEMENT):
            last = text
        out.append(last)
    return out


def reference(tokenizer, ids: list[int], stop_strings: tuple[str, ...]):
    """(final text, index of the stopping token or None, complete texts)."""
    complete = complete_texts(tokenizer, ids)
    for k, text in enumerate(complete):
        hits = [text.find(s) for s in stop_strings if s in text]
        if hits:
            return text[:min(hits)], k, complete
    return (complete[-1] if complete else ""), None, complete


def check_stream(tokenizer, ids: list[int], stop_strings: tuple[str, ...] = ()) -> tuple[str, int | None]:
    deltas, stopped_at, stream = run_stream(tokenizer, ids, stop_strings)
    final, ref_stop, complete = reference(tokenizer, ids, stop_strings)
    released = "".join(deltas)
    assert stopped_at == ref_stop
    assert released == final == stream.text
    assert stream.stopped == (ref_stop is not None)
    if REPLACEMENT not in tokenizer.decode(ids, skip_special_tokens=True):
        assert not any(REPLACEMENT in d for d in deltas)
    holdback = max((len(s) for s in stop_strings), default=1) - 1
    cumulative = ""
    for k, delta in enumerate(deltas[:-1]):  # before the final flush: lag at most `holdback` characters
        cumulative += delta
        assert complete[k].startswith(cumulative)
        assert len(cumulative) >= len(complete[k]) - holdback, (k, cumulative, complete[k])
        if not stop_strings:
            assert cumulative == complete[k]  # nothing held back but unfinished characters
    return final, stopped_at


# ---- the tokenizer really splits characters across tokens -------------------------------------------------
def test_bpe_fixture_splits_multibyte_characters(bpe):
    ids = bpe.encode("日本 🚀 𝄞", add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    assert sum(REPLACEMENT in p for p in pieces) >= 4  # several tokens hold only part of a character
    assert bpe.decode(ids) == "日本 🚀 𝄞"
    assert bpe.clean_up_tokenization_spaces is False


# ---- no stop strings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "hello world",
    "你好世界 日本語 🚀😀👍🏽 café €",
    "𝄞𝄞𝄞",
    "",
    "a\nb\n\n  c  ",
])
def test_deltas_concatenate_to_decode(bpe, text):
    ids = bpe.encode(text, add_special_tokens=False)
    final, stopped_at = check_stream(bpe, ids)
    assert stopped_at is None
    assert final == bpe.decode(ids, skip_special_tokens=True) == text


def test_split_emoji_released_only_when_complete(bpe):
    ids = bpe.encode("ab🚀cd", add_special_tokens=False)
    deltas, _, _ = run_stream(bpe, ids)
    rocket_tokens = [k for k, i in enumerate(ids) if REPLACEMENT in bpe.decode([i])]
    assert len(rocket_tokens) >= 2
    for k in rocket_tokens[:-1]:
        assert deltas[k] == ""  # the first bytes of the emoji release nothing
    assert "🚀" in deltas[rocket_tokens[-1]]
    assert "".join(deltas) == "ab🚀cd"


def test_special_tokens_are_skipped(bpe):
    eos = bpe.eos_token_id
    ids = bpe.encode("hello ", add_special_tokens=False) + [eos] + bpe.encode("world😀", add_special_tokens=False)
    final, _ = check_stream(bpe, ids)
    assert final == "hello world😀" == bpe.decode(ids, skip_special_tokens=True)


def test_unfinished_character_at_the_end_is_not_released(bpe):
    ids = bpe.encode("ok 🚀", add_special_tokens=False)
    cut = [k for k, i in enumerate(ids) if REPLACEMENT in bpe.decode([i])][0] + 1  # stop inside the emoji
    assert bpe.decode(ids[:cut]).endswith(REPLACEMENT)
    deltas, _, stream = run_stream(bpe, ids[:cut])
    assert REPLACEMENT not in "".join(deltas)
    assert "".join(deltas) == stream.text == complete_texts(bpe, ids[:cut])[-1]
    assert stream.text in ("ok", "ok ")  # this BPE may glue the space to the emoji's first byte


# ---- stop strings -------------------------------------------------------------------------------------
def test_stop_string_spanning_several_tokens(bpe):
    text = "The quick brown fox jumps over the lazy dog."
    ids = bpe.encode(text, add_special_tokens=False)
    stop = "brown fox ju"
    pieces = [bpe.decode([i]) for i in ids]
    first = next(k for k in range(len(ids)) if "brown" in "".join(pieces[:k + 1]))
    last = next(k for k in range(len(ids)) if stop in "".join(pieces[:k + 1]))
    assert last > first  # the stop string is spread over several tokens
    stream = TextStream(bpe, (stop,))
    released = ""
    for k, token in enumerate(ids):
        hit = stream.add(token)
        assert hit == (k >= last)
        released += stream.release(final=hit)
        assert "The quick ".startswith(released)  # no character of the stop string is ever released
        if hit:
            break
    assert k == last
    assert released == stream.text == "The quick "
    assert stream.release() == "" and stream.release(final=True) == ""


def test_stop_string_at_the_start_releases_nothing(bpe):
    ids = bpe.encode("stop here STOP now.", add_special_tokens=False)
    deltas, stopped_at, stream = run_stream(bpe, ids, ("stop",))
    assert stopped_at is not None and "".join(deltas) == "" and stream.text == ""


def test_stopped_stream_reports_stop_and_flushes_once(bpe):
    ids = bpe.encode("abc STOP more", add_special_tokens=False)
    deltas, stopped_at, stream = run_stream(bpe, ids, ("STOP",))
    assert stopped_at is not None and stopped_at < len(ids) - 1
    assert "".join(deltas) == stream.text == "abc "
    assert stream.release() == "" and stream.release(final=True) == ""


def test_tokens_after_a_stop_are_ignored(bpe):
    ids = bpe.encode("abc STOP more text STOP x", add_special_tokens=False)
    stream = TextStream(bpe, ("STOP",))
    hit_at = next(k for k, token in enumerate(ids) if stream.add(token))
    assert stream.release(final=True) == "abc "
    for token in ids[hit_at + 1:]:
        assert stream.add(token) is True
        assert stream.release() == ""
    assert stream.text == "abc "


def test_partial_stop_string_is_held_back_then_flushed(bpe):
    ids = bpe.encode("abc STO", add_special_tokens=False)
    stream = TextStream(bpe, ("STOP",))
    released = ""
    for token in ids:
        assert not stream.add(token)
        released += stream.release()
    assert released == "abc "  # "STO" could still become "STOP"
    assert released + stream.release(final=True) == "abc STO"


def test_earliest_completed_stop_string_wins(bpe):
    # "bc" completes no later than "abcd"; whichever completes first cuts the text
    ids = bpe.encode("xabcdy", add_special_tokens=False)
    final, stopped_at = check_stream(bpe, ids, ("abcd", "bc"))
    assert final in ("x", "xa") and stopped_at is not None
    # two stop strings completed by the same token: cut at the earliest occurrence
    stream = TextStream(bpe, ("lo", "hel"))
    for token in bpe.encode("hello", add_special_tokens=False):
        if stream.add(token):
            break
    assert stream.text == ""  # "hel" completes first (or with "lo"): cut before it


@pytest.mark.parametrize("text, stop, expected", [
    ("hi 😀 there", "😀", "hi "),
    ("你好世界 日本語", "世界", "你好"),
    ("café au lait", "é a", "caf"),
    ("one\ntwo\n\nthree", "\n\n", "one\ntwo"),
    ("no stop here", "xyz", "no stop here"),
])
def test_multibyte_stop_strings(bpe, text, stop, expected):
    ids = bpe.encode(text, add_special_tokens=False)
    final, stopped_at = check_stream(bpe, ids, (stop,))
    assert final == expected
    assert (stopped_at is None) == (stop not in text)


# ---- property tests -----------------------------------------------------------------------------------
texts = st.text(alphabet=st.sampled_from(ALPHABET), max_size=40)


@st.composite
def text_and_stops(draw):
    text = draw(texts)
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if text and draw(st.booleans()):
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i + 1, min(len(text), i + 6)))
            stops.append(text[i:j])  # a substring: it will be hit
        else:
            stops.append(draw(st.text(alphabet=st.sampled_from(ALPHABET), min_size=1, max_size=4)))
    return text, tuple(stops)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_and_stops())
def test_property_bpe(bpe, case):
    text, stops = case
    ids = bpe.encode(text, add_special_tokens=False)
    final, stopped_at = check_stream(bpe, ids, stops)
    ends = {s: text.find(s) + len(s) for s in stops if s in text}
    if not ends:
        assert final == text and stopped_at is None
    else:
        assert stopped_at is not None
        first_done = min(ends, key=ends.get)  # generation stops at the first stop string to COMPLETE
        assert len(final) <= text.find(first_done)
        assert text.startswith(final)
        assert not any(s in final for s in stops)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 349), max_size=25), stops=st.lists(st.sampled_from(["a", "é", "😀", "\ufffd"]),
                                                                       max_size=2))
def test_property_arbitrary_token_ids(bpe, ids, stops):
    """Random ids (invalid UTF-8 included): still consistent with the reference semantics."""
    check_stream(bpe, ids, tuple(stops))


# ---- the real SmolLM2 tokenizer -----------------------------------------------------------------------
@pytest.mark.parametrize("text, stops, expected", [
    ("Hello, world! 你好世界 🚀😀👍🏽 naïve", (), "Hello, world! 你好世界 🚀😀👍🏽 naïve"),
    ("The answer is 42.\nUser: next question", ("\nUser:",), "The answer is 42."),
    ("Emoji 🚀 split 🚀 twice", ("split 🚀",), "Emoji 🚀 "),
    ("日本語のテキスト。終わり", ("終わり", "。終"), "日本語のテキスト"),
])
def test_smollm2_tokenizer(smollm2, text, stops, expected):
    ids = smollm2.encode(text, add_special_tokens=False)
    assert smollm2.decode(ids, skip_special_tokens=True) == text
    final, stopped_at = check_stream(smollm2, ids, stops)
    assert final == expected
    assert (stopped_at is None) == (not stops)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=text_and_stops())
def test_property_smollm2(smollm2, case):
    text, stops = case
    ids = smollm2.encode(text, add_special_tokens=False)
    final, _ = check_stream(smollm2, ids, stops)
    if not any(s in text for s in stops):
        assert final == text


# ---- through the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_text_target(bpe):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from blockspec.draft import DraftConfig, DraftModel
    from blockspec.target import target_from_hf

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    vocab = len(bpe)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(1.0 if name.endswith("norm.weight") else 0.5 * seeded_normal(0, name, param.shape))
    target = target_from_hf(hf, tokenizer=bpe)
    dcfg = DraftConfig.create("dflash", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16, vocab_size=vocab, num_target_layers=2, block_size=4,
                              mask_token_id=0)
    draft = DraftModel(dcfg).init_weights(seed=3, std=0.5)
    yield target, draft
    torch.set_num_threads(old_threads)


@pytest.mark.parametrize("use_draft", [False, True])
def test_engine_streams_text_and_honours_stop_strings(bpe, tiny_text_target, use_draft):
    from blockspec.engine import SamplingParams, SpeculativeDecoder

    target, draft = tiny_text_target
    decoder = SpeculativeDecoder(target, draft if use_draft else None)
    prompt = bpe.encode("hello world", add_special_tokens=False)
    base = SamplingParams(temperature=1.0, seed=11, max_new_tokens=40, ignore_eos=True)
    free = decoder.generate(prompt, base)
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    complete = complete_texts(bpe, free.token_ids)
    assert free.text == complete[-1]
    # a stop string taken from the middle of the free-running text
    text = free.text
    clean = [i for i in range(len(text) // 3, len(text) - 3) if REPLACEMENT not in text[i:i + 3]]
    assert clean, text
    stop = text[clean[0]:clean[0] + 3]
    final, ref_stop, _ = reference(bpe, free.token_ids, (stop,))
    chunks = list(decoder.stream(prompt, SamplingParams(temperature=1.0, seed=11, max_new_tokens=40,
                                                        ignore_eos=True, stop_strings=(stop,))))
    result = chunks[-1].result
    assert result is not None and all(c.result is None for c in chunks[:-1])
    assert result.finish_reason == "stop"
    assert result.token_ids == free.token_ids[:ref_stop + 1]  # same seed, same tokens, cut at the hit
    assert result.text == final and stop not in result.text
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids

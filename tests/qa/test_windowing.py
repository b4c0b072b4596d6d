"""Windows tokenized with the Rust tokenizer directly are exactly the transformers call's, for every family."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qaserve.errors import InvalidArgument
from qaserve.qa import QAParams
from qaserve.qa.windowing import WindowSplitter, resolve_params

from qaserve_testing import FAMILIES, TOKENIZER_TEXTS, build_tokenizer

QUESTIONS = ("  Where does the river flow?", "Who built the mill, and when?", "Wo liegt Zürich?", "東京?")
CONTEXTS = (
    TOKENIZER_TEXTS[1],
    " ".join(TOKENIZER_TEXTS) * 3,  # several windows
    "Der Fluss fließt durch Zürich; São Paulo liegt in Brasilien, 東京 in Japan 🗾. Ein Café   für naïve Gäste.",
)
# (max_seq_len, doc_stride): one window, several with a narrow and a wide overlap.
SHAPES = ((384, 128), (48, 8), (64, 24))


@pytest.fixture(scope="module", params=list(FAMILIES))
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return build_tokenizer(FAMILIES[request.param])


def on_the_left(tokenizer: Any, setting: str) -> Any:
    """A copy of the tokenizer that pads (the pipeline then puts the question second) or truncates on the left."""
    flipped = copy.deepcopy(tokenizer)
    setattr(flipped, setting, "left")
    return flipped


def transformers_windows(tokenizer: Any, question: str, context: str, max_seq_len: int, stride: int) -> Any:
    """The transformers call the pipeline makes (question first unless the tokenizer pads on the left)."""
    question_first = tokenizer.padding_side == "right"
    return tokenizer(
        text=question if question_first else context,
        text_pair=context if question_first else question,
        truncation="only_second" if question_first else "only_first",
        max_length=max_seq_len,
        stride=stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
    )


@pytest.mark.parametrize("left", ["", "padding_side", "truncation_side"])
def test_windows_are_the_transformers_encodings(tokenizer: Any, left: str) -> None:
    tokenizer = on_the_left(tokenizer, left) if left else tokenizer
    splitter = WindowSplitter(copy.deepcopy(tokenizer))
    for question in QUESTIONS:
        for context in CONTEXTS:
            for max_seq_len, stride in SHAPES:
                params = resolve_params(QAParams(max_seq_len=max_seq_len, doc_stride=stride), 512)
                windows = splitter.split(question, context, params)
                expected = transformers_windows(tokenizer, question.lstrip(), context, max_seq_len, stride)
                assert windows.input_ids == expected["input_ids"]
                if "token_type_ids" in tokenizer.model_input_names:
                    assert windows.token_type_ids == expected["token_type_ids"]
                else:
                    assert windows.token_type_ids is None
                assert len(windows.encodings) == len(expected.encodings)
                for ours, theirs in zip(windows.encodings, expected.encodings, strict=True):
                    assert ours.offsets == theirs.offsets
                    assert ours.sequence_ids == theirs.sequence_ids
                    assert ours.word_ids == theirs.word_ids
                    assert ours.type_ids == theirs.type_ids
                    assert ours.special_tokens_mask == theirs.special_tokens_mask
                assert windows.context_index == (0 if left == "padding_side" else 1)


def test_settings_left_on_the_rust_tokenizer_do_not_change_the_windows(tokenizer: Any) -> None:
    """A tokenizer.json may ship with padding or truncation set: the windows are still the transformers call's."""
    params = resolve_params(QAParams(max_seq_len=48, doc_stride=8), 512)
    expected = transformers_windows(tokenizer, QUESTIONS[0].lstrip(), CONTEXTS[1], 48, 8)
    preset = copy.deepcopy(tokenizer)
    preset.backend_tokenizer.enable_padding(length=64, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    preset.backend_tokenizer.enable_truncation(8, stride=2, strategy="longest_first")
    assert WindowSplitter(preset).split(QUESTIONS[0], CONTEXTS[1], params).input_ids == expected["input_ids"]


def test_the_question_is_counted_as_transformers_counts_it(tokenizer: Any) -> None:
    question = QUESTIONS[1] * 3
    counted = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    params = resolve_params(QAParams(max_question_len=counted - 1), 512)
    with pytest.raises(InvalidArgument, match=f"is {counted} tokens; max_question_len is {counted - 1}"):
        WindowSplitter(tokenizer).split(question, CONTEXTS[0], params)

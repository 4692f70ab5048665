"""MT-Bench single-answer grading (first turn): judge prompts and strict ``[[rating]]`` parsing.

MT-Bench (Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", NeurIPS 2023
Datasets and Benchmarks, arXiv:2306.05685) has 80 two-turn questions in 8 categories. The seed
paper's helpfulness metric "MT-1" is the GPT-4 single-answer score (1-10) of the first turn only
(arXiv:2406.10630, Sec. 6.1). The grading prompts are FastChat's ``single-v1`` and, for categories
with reference answers (math, reasoning, coding), ``single-math-v1``; the judge answers with an
explanation ending in ``[[rating]]``.

Parsing is strict: the reply must contain ``[[x]]`` with ``x`` a number in [1, 10]; several
``[[x]]`` with different values, or none, make the reply unparseable (None). FastChat's fallback to
a single-bracket ``[x]`` is not used: it also matches list markers and citations.
"""

from __future__ import annotations

import re
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant."

_JUDGE_INTRO = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. "
)
_RATE = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by "
    'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)
_ANSWER = "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"

SINGLE_V1 = (
    _JUDGE_INTRO
    + "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of the response. Begin your evaluation by providing a "
    "short explanation. Be as objective as possible. "
    + _RATE
    + "[Question]\n{question}\n\n"
    + _ANSWER
)

SINGLE_MATH_V1 = (
    _JUDGE_INTRO
    + "Your evaluation should consider correctness and helpfulness. You will be given a reference "
    "answer and the assistant's answer. Begin your evaluation by comparing the assistant's answer "
    "with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
    + _RATE
    + "[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
    "[The End of Reference Answer]\n\n"
    + _ANSWER
)

NEED_REFERENCE = ("math", "reasoning", "coding")

# FastChat's answer-generation temperatures per category (gen_model_answer.py), as the paper used.
CATEGORY_TEMPERATURE: dict[str, float] = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1,
}


def judge_messages(question: str, answer: str, category: str | None = None,
                   reference: str | None = None) -> list[dict[str, str]]:
    """The grading conversation for one first-turn answer.

    ``single-math-v1`` is used when the category needs a reference and one is given; otherwise
    ``single-v1``.
    """
    if category in NEED_REFERENCE and reference:
        template, fields = SINGLE_MATH_V1, {"question": question, "answer": answer,
                                            "ref_answer_1": reference}
    else:
        template, fields = SINGLE_V1, {"question": question, "answer": answer}
    # Substitute on the template's pieces only: answers may contain "{answer}" or braces themselves.
    parts = re.split(r"(\{question\}|\{answer\}|\{ref_answer_1\})", template)
    # re.split with a capture group puts the placeholders at the odd positions.
    text = "".join(fields[p[1:-1]] if i % 2 else p for i, p in enumerate(parts))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The ``[[rating]]`` of a judge reply, or None if absent, ambiguous or outside [1, 10]."""
    values = {float(v) for v in _RATING.findall(text)}
    if len(values) != 1:
        return None
    (value,) = values
    return value if 1.0 <= value <= 10.0 else None


def rating_row(reply: str) -> dict[str, Any]:
    """A judge row for one reply: ``{"score": rating or None, "raw": reply}``."""
    return {"score": parse_rating(reply), "raw": reply}

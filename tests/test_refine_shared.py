"""Refine's LLM prefills the start every prompt shares (system turn) once per actor; verify scores and
referring answers are those of each full prompt alone (tiny Qwen2 LM, float32)."""

from __future__ import annotations

import pytest
from conftest import FIXTURE_CONFIG

from engine.config import GenerationConfig
from pipelines.rexverse2m import load_job_config
from stages.llm import ChatLM

pytestmark = pytest.mark.timeout(300)
PAIRS = [
    ("large yellow ring", "A large yellow ring lies near the top of the image."),
    ("gray cross", "A medium gray cross on a beige background."),
    ("small red triangle", "A cat sleeping on a sofa."),
    ("blue square", "A blue square."),
]


@pytest.fixture(scope="module")
def cfg():
    return load_job_config(FIXTURE_CONFIG).stages.refine


def build(cfg, shared: bool, generation: GenerationConfig | None = None) -> ChatLM:
    return ChatLM(cfg.model, generation or cfg.generation, cfg.system_prompt, shared_prefix=shared)


def test_the_shared_start_is_the_system_turn(cfg):
    lm = build(cfg, True)
    start = lm.tokenizer.decode(lm.prefix_ids)
    assert cfg.system_prompt in start and start.rstrip().endswith("user")
    assert build(cfg, False).prefix_ids == []


def test_verify_scores_and_referring_answers_match_each_full_prompt_alone(cfg):
    shared, alone = build(cfg, True), build(cfg, False)
    yes, no = shared.answer_token_ids(cfg.yes_words, cfg.no_words)
    verify = [cfg.verify_prompt.format(phrase=p, description=d) for p, d in PAIRS]
    scores = shared.yes_probability(verify, yes, no)
    reference = [alone.yes_probability([p], yes, no)[0] for p in verify]
    assert scores == pytest.approx(reference, abs=1e-5)
    assert max(reference) - min(reference) > 1e-4  # the scores depend on the prompt
    referring = [cfg.referring_prompt.format(phrase=p, description=d, category=p) for p, d in PAIRS]
    answers = shared.generate(referring)
    assert answers == [alone.generate([p])[0] for p in referring]
    assert len(set(answers)) > 1
    assert shared.counts["prefix_prefills"] == 1  # once for both calls
    assert shared.counts["prefill_tokens"] < alone.counts["prefill_tokens"] - len(shared.prefix_ids)


def test_retry_prompts_and_penalties_match(cfg):
    generation = GenerationConfig(max_new_tokens=8, min_new_tokens=2, repetition_penalty=1.2)
    shared, alone = build(cfg, True, generation), build(cfg, False, generation)
    prompts = [cfg.referring_prompt.format(phrase=p, description=d, category=p) for p, d in PAIRS]
    prompts[1] += "\n" + cfg.referring_retry_prompt.format(
        answer="x", reason="too short", min_words=5, max_words=10
    )
    assert shared.generate(prompts) == [alone.generate([p])[0] for p in prompts]

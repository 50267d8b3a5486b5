"""The continuous-batching engine: batched == alone == transformers' generate, joins and leaves
between steps, per-request sampling generators, stop strings, streaming, cancellation, limits."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from PIL import Image

from conftest import seeded, tiny_model_config
from vlmkit.config import FusionConfig
from vlmkit.inference.engine import (
    Engine, EngineThread, PromptTooLongError, QueueFullError, SamplingParams, StreamDelta, finish_ids,
)
from vlmkit.inference.pipeline import VLMPipeline, generate_kwargs
from vlmkit.models.build import build_model
from vlmkit.models.language.base import NotGenerativeError
from vlmkit.processing.processor import Encoded

COLOURS = [(210, 30, 30), (30, 30, 210), (30, 200, 30), (230, 230, 30), (120, 40, 160), (20, 20, 20)]
QUESTIONS = ["what color is it?", "describe the image in a few words please", "shape?",
             "is there a circle in the picture or not, tell me", "hi", "what is the colour of the shape on the left?"]


def _model(tokenizer, **kw):
    seeded(kw.pop("seed", 0))
    fusion = kw.pop("fusion", None)
    cfg = tiny_model_config(**kw)
    if fusion:
        cfg.fusion = FusionConfig(type=fusion, options={"every": 1})
    model, processor = build_model(cfg, tokenizer=tokenizer)
    return model.eval(), processor


def _prompts(processor, n=6):
    return [processor.prompt(QUESTIONS[i % len(QUESTIONS)], [Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)])])
            for i in range(n)]


def _hf_greedy(model, processor, encoded, max_tokens):
    """transformers' generate on one prompt (the reference)."""
    batch = processor.collate([encoded], padding_side="left")
    out = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_counts"],
                         **generate_kwargs(processor, SamplingParams(max_tokens=max_tokens)))
    return processor.decode(finish_ids(processor, out[0].tolist())[0])


@pytest.fixture
def tiny(tokenizer):
    return _model(tokenizer)


def test_batched_greedy_equals_alone_and_transformers_generate(tiny):
    model, processor = tiny
    prompts = _prompts(processor)
    lengths = {p.input_ids.numel() for p in prompts}
    assert len(lengths) > 3, "the prompts must differ in length for the padding to matter"
    params = SamplingParams(max_tokens=12)
    batched = Engine(model, processor, max_batch_size=8).generate(prompts, params)
    alone = [Engine(model, processor, max_batch_size=1).generate([p], params)[0] for p in prompts]
    reference = [_hf_greedy(model, processor, p, 12) for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone] == reference
    assert len({c.text for c in batched}) > 3, "a tiny random model should answer the images differently"
    # no-cache reference path agrees too
    assert [c.text for c in Engine(model, processor).generate(prompts, params, use_cache=False)] == reference
    for c, p in zip(batched, prompts):
        assert c.prompt_tokens == p.input_ids.numel() and c.finish_reason in ("stop", "length")
        assert c.completion_tokens <= 12


def test_requests_join_and_leave_between_steps(tiny):
    model, processor = tiny
    prompts = _prompts(processor)
    expected = [Engine(model, processor).generate([p], SamplingParams(max_tokens=m))[0].text
                for p, m in zip(prompts, [20, 3, 20, 5, 8, 20])]
    engine = Engine(model, processor, max_batch_size=3)
    long_ = engine.add(prompts[0], SamplingParams(max_tokens=20))
    short = engine.add(prompts[1], SamplingParams(max_tokens=3))
    engine.step()
    engine.step()
    assert engine.num_running == 2
    late = [engine.add(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts[2:], [20, 5, 8, 20])]
    sizes = []
    while engine.has_work():
        engine.step()
        sizes.append(engine.num_running)
    assert max(sizes) == 3, "max_batch_size bounds the running batch"
    assert short.completion.completion_tokens <= 3 and short.finished
    got = [r.completion.text for r in [long_, short, *late]]
    assert got == expected


def test_sampling_uses_a_generator_per_request_not_the_global_rng(tiny):
    model, processor = tiny
    prompts = _prompts(processor, 4)
    params = [SamplingParams(max_tokens=10, temperature=1.5, top_p=0.9, top_k=50, seed=s) for s in (1, 2, 3, 4)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    together = Engine(model, processor).generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state), "sampling touched the global RNG"
    alone = [Engine(model, processor).generate([p], s)[0] for p, s in zip(prompts, params)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    again = Engine(model, processor).generate(prompts, params)
    assert [c.text for c in again] == [c.text for c in together]
    other = Engine(model, processor).generate(prompts, [SamplingParams(max_tokens=10, temperature=1.5, seed=s) for s in (9, 8, 7, 6)])
    assert [c.token_ids for c in other] != [c.token_ids for c in together]


def test_top_k_one_is_greedy(tiny):
    model, processor = tiny
    prompts = _prompts(processor, 3)
    greedy = Engine(model, processor).generate(prompts, SamplingParams(max_tokens=8))
    top1 = Engine(model, processor).generate(prompts, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=0))
    assert [c.text for c in top1] == [c.text for c in greedy]


def test_stop_strings_and_length(tiny):
    model, processor = tiny
    prompt = _prompts(processor, 1)[0]
    full = Engine(model, processor).generate([prompt], SamplingParams(max_tokens=16))[0]
    assert full.finish_reason == "length" and full.completion_tokens == 16, "pick a prompt the tiny model does not stop on"
    middle = len(full.text) // 2
    stop = next(full.text[i:i + 3] for i in range(middle, len(full.text) - 3) if "\ufffd" not in full.text[i:i + 3])
    cut = Engine(model, processor).generate([prompt], SamplingParams(max_tokens=16, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text) and cut.text == full.text[: full.text.index(stop)].strip()
    assert cut.completion_tokens < 16


def test_streamed_deltas_add_up_to_the_answer_and_cancel_stops(tiny):
    model, processor = tiny
    prompts = _prompts(processor, 3)
    expected = Engine(model, processor).generate(prompts, SamplingParams(max_tokens=14))
    runner = EngineThread(Engine(model, processor), max_queued=8)
    try:
        streams = [runner.submit(p, SamplingParams(max_tokens=14)) for p in prompts]
        for stream, want in zip(streams, expected):
            deltas = list(stream)
            assert all(isinstance(d, StreamDelta) for d in deltas)
            assert "".join(d.text for d in deltas) == want.text
            assert deltas[-1].finish_reason == want.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
            assert stream.result().text == want.text and stream.prompt_tokens == want.prompt_tokens

        async def read(stream):
            return "".join([d.text async for d in stream])

        stream = runner.submit(prompts[0], SamplingParams(max_tokens=14))
        assert asyncio.run(read(stream)) == expected[0].text
        # cancellation: a long request stops early with finish_reason 'cancelled'
        long_ = runner.submit(prompts[1], SamplingParams(max_tokens=200))
        long_.cancel()
        assert long_.result(timeout=30).finish_reason == "cancelled"
        assert long_.result().completion_tokens < 200
        assert runner.healthy
    finally:
        runner.close()


def test_queue_limit_and_context_length(tiny):
    model, processor = tiny
    prompt = _prompts(processor, 1)[0]
    engine = Engine(model, processor)
    with pytest.raises(PromptTooLongError, match=r"max_tokens is 100000.*context of \d+ tokens"):
        engine.add(prompt, SamplingParams(max_tokens=100_000), strict=True)
    # not strict: the answer ends at the context (finish_reason 'length')
    small = Engine(model, processor)
    small.context_length = prompt.input_ids.numel() + 10  # this prompt runs past 16 tokens (test_stop_strings_and_length)
    capped = small.generate([prompt], SamplingParams(max_tokens=100_000))[0]
    assert capped.finish_reason == "length" and capped.completion_tokens == 10
    too_long = Encoded(torch.ones(engine.context_length, dtype=torch.long), None, torch.zeros(0, 3, 32, 32))
    with pytest.raises(PromptTooLongError, match="no room left"):
        engine.add(too_long)
    gate = threading.Event()
    runner = EngineThread(engine, max_queued=2)
    try:
        original = engine.step
        engine.step = lambda: (gate.wait(10), original())[1]  # hold the engine so the queue fills
        first = runner.submit(prompt, SamplingParams(max_tokens=2))
        second = runner.submit(prompt, SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError, match="2 requests are already queued"):
            runner.submit(prompt, SamplingParams(max_tokens=2))
        gate.set()
        assert first.result(30).text == second.result(30).text
    finally:
        runner.close()


@pytest.mark.parametrize("field,value,message", [
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("temperature", -1.0, "temperature must be a number >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_k", -2, "top_k must be an integer >= 0"),
    ("stop", [""], "stop strings must be non-empty"),
    ("seed", "x", "seed must be an integer"),
])
def test_sampling_params_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_cross_attention_context_is_per_request_and_its_keys_are_computed_once(tokenizer):
    model, processor = _model(tokenizer, connector="resampler",
                              connector_options={"num_latents": 4, "depth": 1, "num_heads": 2, "head_dim": 8},
                              fusion="cross_attention")
    for block in model.fusion.blocks:  # open the gates so the images matter
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)
    assert not hasattr(model.fusion, "_context"), "request state must not live on the shared module"
    prompts = _prompts(processor)
    params = SamplingParams(max_tokens=10)
    reference = Engine(model, processor).generate(prompts, params, use_cache=False)
    calls = []
    for block in model.fusion.blocks:
        original = block.project_media
        block.project_media = lambda media, original=original: (calls.append(media.shape[0]), original(media))[1]
    engine = Engine(model, processor, max_batch_size=4)
    batched = engine.generate(prompts, params)
    assert [c.text for c in batched] == [c.text for c in reference]
    assert len({c.text for c in batched}) > 2
    # one projection per block per prefill group (two groups: 4 then 2 requests), none per decode step
    assert sorted(calls) == sorted([4, 4, 2, 2])
    # a text-only request joins a batch of image requests (its context is empty and masked out)
    text_only = processor.prompt("say something without a picture", [])
    mixed = [prompts[0], text_only, prompts[1]]
    alone = [Engine(model, processor).generate([p], params, use_cache=False)[0].text for p in mixed]
    engine = Engine(model, processor, max_batch_size=3)
    first = engine.add(prompts[0], params)
    engine.step()
    later = [engine.add(p, params) for p in mixed[1:]]
    engine.run()
    assert [r.completion.text for r in [first, *later]] == alone


def test_encoder_decoder_runs_through_the_engine(tokenizer):
    model, processor = _model(tokenizer, backbone="flan_t5", template="plain")
    prompts = _prompts(processor, 3)
    got = Engine(model, processor).generate(prompts, SamplingParams(max_tokens=6))
    assert [c.text for c in got] == [_hf_greedy(model, processor, p, 6) for p in prompts]


def test_encoder_only_models_do_not_generate(tokenizer):
    model, processor = _model(tokenizer, backbone="roberta")
    with pytest.raises(NotGenerativeError, match="encoder-only"):
        Engine(model, processor)


def test_pipeline_generate_runs_on_the_engine(tiny):
    model, processor = tiny
    pipe = VLMPipeline(model, processor)
    images = [[Image.new("RGB", (32, 32), c)] for c in COLOURS[:3]]
    answers = pipe.generate(QUESTIONS[:3], images)
    assert answers == [c.text for c in pipe.engine.generate(
        [processor.prompt(q, i) for q, i in zip(QUESTIONS[:3], images)], SamplingParams(max_tokens=128))]


def test_a_failed_step_ends_only_its_requests(tiny):
    model, processor = tiny
    prompt = _prompts(processor, 1)[0]
    expected = Engine(model, processor).generate([prompt], SamplingParams(max_tokens=4))[0].text
    engine = Engine(model, processor)
    runner = EngineThread(engine, max_queued=4)
    try:
        original = engine._decode
        calls = []

        def broken(done):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated kernel failure")
            return original(done)

        engine._decode = broken
        failed = runner.submit(prompt, SamplingParams(max_tokens=4))
        assert failed.result(30).finish_reason == "error" and failed.completion is not None
        assert runner.healthy and runner.failures == 1 and "simulated" in str(runner.last_failure)
        assert runner.submit(prompt, SamplingParams(max_tokens=4)).result(30).text == expected
        assert engine.num_running == 0 and engine.num_waiting == 0
    finally:
        runner.close()

"""AsyncEngine: the step loop in a thread; requests stream as async iterators."""

from __future__ import annotations

import asyncio

import pytest

from idlm.config import ConfigError, DecodeConfig, SamplingParams
from idlm.decode import isd_generate
from idlm.engine import AsyncEngine, EngineDeadError, EngineStepError

from ..decode.tiny import tiny_model
from .test_engine import engine

PARAMS = SamplingParams(max_new_tokens=20, ignore_eos=True)


async def _collect(eng: AsyncEngine, prompt: list[int], cfg: DecodeConfig) -> tuple[list[int], list]:
    tokens, outs = [], []
    async for out in eng.generate(prompt, PARAMS, cfg):
        tokens += out.new_token_ids
        outs.append(out)
    return tokens, outs


def test_concurrent_streams_match_the_oracle_and_an_early_exit_aborts() -> None:
    model = tiny_model(seed=20, vocab=8)
    cfg = DecodeConfig(stride=3)

    async def main() -> None:
        eng = AsyncEngine(engine(model, max_running=4))
        eng.start()
        prompts = [[1, 2, 3], [4, 5], [6, 1, 1, 2]]
        results = await asyncio.gather(*[_collect(eng, p, cfg) for p in prompts])
        for p, (tokens, outs) in zip(prompts, results):
            assert tokens == isd_generate(model, p, cfg, PARAMS).tokens
            assert len(outs) > 2 and outs[-1].finished and outs[-1].finish_reason == "length"
            assert not any(o.finished for o in outs[:-1])
        async for _ in eng.generate([3, 3, 3], SamplingParams(max_new_tokens=500, ignore_eos=True), cfg):
            break  # the client goes away after the first tokens
        for _ in range(200):  # the abort is applied between steps
            if eng.engine.blocks.num_used == 0 and not eng.engine.requests:
                break
            await asyncio.sleep(0.01)
        assert eng.engine.blocks.num_used == 0 and eng.engine.metrics.finished.get("abort") == 1
        with pytest.raises(ConfigError) as e:  # bad input fails fast, in the caller
            async for _ in eng.generate([], PARAMS, cfg):
                pass
        assert e.value.field == "prompt"
        await eng.shutdown(timeout=5)
        assert not eng.alive

    asyncio.run(main())


def test_a_failing_step_kills_the_loop_and_reports_to_every_request() -> None:
    model = tiny_model(seed=21, vocab=8)

    async def main() -> None:
        core = engine(model)
        eng = AsyncEngine(core)

        def boom():
            raise RuntimeError("kernel exploded")

        core.step = boom
        eng.start()
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            async for _ in eng.generate([1, 2], PARAMS, DecodeConfig()):
                pass
        assert not eng.alive and "kernel exploded" in eng.error
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate([1, 2], PARAMS, DecodeConfig()):
                pass

    asyncio.run(main())


def test_shutdown_drains_open_requests() -> None:
    model = tiny_model(seed=22, vocab=8)

    async def main() -> None:
        eng = AsyncEngine(engine(model))
        eng.start()
        task = asyncio.create_task(_collect(eng, [5, 4, 3], DecodeConfig(stride=2)))
        await asyncio.sleep(0)  # let it queue
        await asyncio.sleep(0.05)
        await eng.shutdown(timeout=30)
        tokens, outs = await task
        assert outs[-1].finished and outs[-1].finish_reason == "length" and len(tokens) == 20
        with pytest.raises(EngineDeadError):
            async for _ in eng.generate([1], PARAMS, DecodeConfig()):
                pass

    asyncio.run(main())


def test_a_failing_step_fails_only_its_requests() -> None:
    """A step that raises aborts the requests it ran (they get EngineStepError, their blocks are
    freed); a request that was waiting is served afterwards, exactly, and the loop stays alive."""
    model = tiny_model(seed=23, vocab=8)

    async def main() -> None:
        core = engine(model, max_running=1)
        eng = AsyncEngine(core)
        real_run = core.runner.run

        def run(items, stationary=False):
            if any(it.request.id == "poison" for it in items) and len(core.requests["poison"].output) >= 3:
                raise RuntimeError("kernel exploded")
            return real_run(items, stationary)

        core.runner.run = run
        eng.start()
        poisoned = asyncio.create_task(_collect_id(eng, [1, 2, 3], "poison"))
        await asyncio.sleep(0.01)
        fine = asyncio.create_task(_collect(eng, [4, 5, 6], DecodeConfig(stride=3)))
        with pytest.raises(EngineStepError, match="kernel exploded"):
            await poisoned
        tokens, _ = await fine
        assert tokens == isd_generate(model, [4, 5, 6], DecodeConfig(stride=3), PARAMS).tokens
        assert eng.alive and core.blocks.num_used == 0
        await eng.shutdown(timeout=5)

    asyncio.run(main())


async def _collect_id(eng: AsyncEngine, prompt: list[int], rid: str) -> list[int]:
    tokens = []
    async for out in eng.generate(prompt, PARAMS, DecodeConfig(stride=3), request_id=rid):
        tokens += out.new_token_ids
    return tokens

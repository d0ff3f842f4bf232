"""The processing pipeline: one per server, like ComfyStream's, shared by every peer with prompts.

It holds the running prompts and their effect chain, the pause state and the test knobs that apply
to every frame (artificial delay, dropping every Nth frame). Frames are processed on a worker
thread: the effects are numpy work and must not hold up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import av

from relay_server.processor.effects import Chain, PromptError, parse_prompt, parse_prompts

log = logging.getLogger(__name__)

WARMUP_FRAMES = 5  # as ComfyStream: a few dummy frames through the workflow before answering
DEFAULT_RESOLUTION = (512, 512)


@dataclass(frozen=True)
class Knobs:
    """Test knobs. delay_ms: artificial processing time per frame; drop_every: drop every Nth
    frame (0: none); max_fps: processing-rate cap (0: none); input_timeout: seconds without an
    input frame after which a returned track ends for good (ComfyStream's watchdog; 0: never);
    queue: input frames kept in arrival order and processed oldest first, as ComfyStream does
    (it queues without bound; this is its bound, the oldest dropping beyond it; 0: only the
    newest frame is kept); loss: the share of RTP packets its link drops each way, as a network
    would (lossy.py; 0: none); loopback: the video goes back as it came, undecoded (loopback.py:
    no effects, and none of the processing knobs apply)."""

    delay_ms: float = 0.0
    drop_every: int = 0
    max_fps: float = 0.0
    input_timeout: float = 5.0
    queue: int = 0
    loss: float = 0.0
    loopback: bool = False

    def __post_init__(self) -> None:
        if min(self.delay_ms, self.drop_every, self.max_fps, self.input_timeout, self.queue, self.loss) < 0:
            raise ValueError(f"knobs must not be negative: {self}")
        if self.loss >= 1:
            raise ValueError(f"loss must be below 1: {self}")
        if self.loopback and (self.delay_ms or self.drop_every or self.max_fps or self.queue):
            raise ValueError("loopback returns the video undecoded: it takes no processing knobs")


class Pipeline:
    """The running prompts (none: noop mode) and the effect chain they select."""

    def __init__(self, knobs: Knobs | None = None) -> None:
        self.knobs = knobs or Knobs()
        self.prompts: list[dict[str, Any]] = []
        self.chain = Chain()
        self.paused = False
        self.resolution = DEFAULT_RESOLUTION
        self.warmup_frames = 0  # dummy frames processed so far, for tests and stats

    async def set_prompts(self, prompts: Any, resolution: tuple[int, int] | None = None) -> None:
        """Replace the running prompts and warm the new chain up; raises PromptError if invalid."""
        chain = Chain(parse_prompts(prompts))
        if resolution is not None:
            self.resolution = resolution
        await self._warm_up(chain)
        self.prompts = list(prompts) if isinstance(prompts, list) else [prompts]
        self.chain = chain
        self.paused = False
        log.info("prompts set: %s", ", ".join(chain.names))

    async def update_prompts(self, prompts: Any) -> None:
        """ComfyStream's update: as many prompts as are running, each valid; no warm-up."""
        if not isinstance(prompts, list):
            raise PromptError("prompts must be a list")
        if len(prompts) != len(self.prompts):
            raise PromptError(
                "Number of updated prompts must match the number of currently running prompts "
                f"({len(prompts)} given, {len(self.prompts)} running)"
            )
        names = [name for prompt in prompts for name in parse_prompt(prompt)]
        self.chain = Chain(names)
        self.prompts = list(prompts)

    def stop_prompts(self) -> None:
        """Back to noop mode (ComfyStream also does this when any peer connection fails or closes)."""
        self.prompts = []
        self.chain = Chain()
        self.paused = False

    def nodes_info(self) -> dict[str, Any]:
        """The running prompts' nodes and their inputs, as `get_nodes` reports them."""
        nodes: dict[str, Any] = {}
        for prompt in self.prompts:
            for node_id, node in prompt.items():
                inputs = node.get("inputs", {})
                nodes[node_id] = {
                    "class_type": node["class_type"],
                    "inputs": {
                        name: {"value": value, "type": type(value).__name__} for name, value in inputs.items()
                    },
                }
        return nodes

    def current_chain(self, with_prompts: bool) -> Chain:
        """The chain a frame goes through: none for a noop peer or while paused."""
        if not with_prompts or self.paused:
            return Chain()
        return self.chain

    async def process(self, frame: av.VideoFrame, chain: Chain) -> av.VideoFrame:
        """Run `chain` on a worker thread, then hold the frame for the artificial delay."""
        # Passthrough only resets the picture type: not worth a thread hop.
        out = chain(frame) if chain.is_passthrough else await asyncio.to_thread(chain, frame)
        if self.knobs.delay_ms:
            # The only deliberate sleep: the test knob that simulates a slow model.
            await asyncio.sleep(self.knobs.delay_ms / 1000)
        return out

    async def _warm_up(self, chain: Chain) -> None:
        width, height = self.resolution
        for _ in range(WARMUP_FRAMES):
            dummy = av.VideoFrame(width, height, "yuv420p")
            await asyncio.to_thread(chain, dummy)
            self.warmup_frames += 1

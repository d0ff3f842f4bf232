"""The embedded processor: a WebRTC server that speaks ComfyStream's contract (see
docs/comfystream.md), with simple effects in place of a ComfyUI workflow."""

from relay_server.processor.effects import PromptError
from relay_server.processor.pipeline import Knobs, Pipeline
from relay_server.processor.server import ProcessorServer

__all__ = ["Knobs", "Pipeline", "ProcessorServer", "PromptError"]

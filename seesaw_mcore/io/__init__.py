"""The job's inputs and outputs (``launch/infer.py``): prompts read and streamed
(``reader``), completions written resumably (``writer``)."""

from seesaw_mcore.io.reader import (
    InputSpec,
    PromptReader,
    PromptRecord,
    read_prompts,
    render_chat,
)
from seesaw_mcore.io.writer import OutputWriter

__all__ = ["InputSpec", "OutputWriter", "PromptReader", "PromptRecord", "read_prompts",
           "render_chat"]

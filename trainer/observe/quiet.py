"""Third-party messages that are understood and carry nothing for a user, silenced in this one place.

Imported by trainer/__init__.py, so it is in force before any entry point (python -m trainer.X) imports
DeepSpeed. Standard library only: the package import must stay cheap (launch scripts' preflight and refusals).

- DeepSpeed 0.19 logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it." (a WARNING on its own logger, to stdout) the first time it looks for an accelerator on a machine
  without CUDA. On CPU that is the intended setting (gloo ranks in CI, tests, laptops); on a GPU machine that
  lacks CUDA, trainer.distributed reports the device it uses anyway. Only this message is dropped: every other
  DeepSpeed warning still shows.
- faiss's loader logs four INFO lines on import about which SIMD build it found ("Could not load library with
  AVX2 support ... No module named 'faiss.swigfaiss_avx2'" on the generic faiss-cpu wheel); our entry points log
  INFO, so they would open every retrieval command. Its logger is raised to WARNING: a real load failure still
  shows.
- torch's FutureWarning "torch.distributed.nn.functional.all_gather is deprecated" (issue 17) no longer occurs:
  trainer/distributed.py gathers with its own autograd function over all_gather_into_tensor, and nothing else
  calls the deprecated function (DeepSpeed only in its Ulysses sequence parallelism, which we do not use). No
  filter is installed for it, so that a new caller would be seen.
"""
from __future__ import annotations

import logging

DEEPSPEED_LOGGER = "DeepSpeed"  # the name deepspeed.utils.logging gives its logger
DROPPED = ("Setting accelerator to CPU",)
FAISS_LOADER_LOGGER = "faiss.loader"


class _DropKnownMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(text) for text in DROPPED)


def install() -> None:
    """Idempotent: the filter sits on the logger object, which DeepSpeed fetches by name (getLogger returns the
    same object before and after DeepSpeed configures its handler)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropKnownMessages) for f in logger.filters):
        logger.addFilter(_DropKnownMessages())
    logging.getLogger(FAISS_LOADER_LOGGER).setLevel(logging.WARNING)

"""A planned interruption of a training run, shared by the resume tests (not a test module itself)."""


class Interrupt(Exception):
    """Raised by the `stop_at` callback: the run stops as if killed after that step's checkpoint."""


def stop_at(step: int):
    """A `train` callback that raises Interrupt once `step` steps are done."""

    def callback(done: int, loss: float) -> None:
        if done == step:
            raise Interrupt

    return callback

"""Device parameters are typed by their default (or parser), so device code reads them without casts.

The ``assert_type`` lines are checked by mypy (``make lint`` type-checks this
file): on an instance a ``Param[T]`` attribute is a ``T``.
"""

from __future__ import annotations

from typing import assert_type

import pytest

from vdev import DefinitionError, Device, Param


def parse_size(text: str) -> int:
    """``4K``, ``2M`` or plain bytes."""
    units = {"K": 1 << 10, "M": 1 << 20}
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text, 0)


class Tunable(Device):
    queues = Param(8, help="queue pairs")
    mode = Param("fast")
    delay = Param(0.1)
    verbose = Param(False)
    size = Param(4096, parser=parse_size)


def test_an_instance_reads_values_of_the_parameters_type() -> None:
    device = Tunable(queues="0x10", mode="slow", delay="1e-3", verbose="on", size="2M")
    assert_type(device.queues, int)
    assert_type(device.mode, str)
    assert_type(device.delay, float)
    assert_type(device.verbose, bool)
    assert_type(device.size, int)
    assert_type(Tunable.queues, Param[int])
    assert (device.queues, device.mode, device.delay, device.verbose, device.size) == (16, "slow", 0.001, True, 2 << 20)
    assert range(device.queues)[-1] == 15  # used as it is


def test_defaults_and_python_values() -> None:
    device = Tunable(delay=1, size=512)
    assert (device.queues, device.mode, device.delay, device.verbose, device.size) == (8, "fast", 1, False, 512)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"queues": "eight"}, "Tunable: bad value for parameter queues='eight': expected an integer"),
        ({"delay": "soon"}, "Tunable: bad value for parameter delay='soon': expected a number"),
        ({"verbose": "maybe"}, "Tunable: bad value for parameter verbose='maybe': expected a boolean"),
        ({"size": "2X"}, "Tunable: bad value for parameter size='2X': invalid literal"),
    ],
)
def test_text_that_does_not_parse_is_one_line_naming_device_and_parameter(given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        Tunable(**given)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_python_value_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Tunable: parameter queues is int, not float 1.5"):
        Tunable(queues=1.5)


def test_a_default_without_a_converter_needs_a_parser() -> None:
    with pytest.raises(DefinitionError, match=r"Param\(\(1, 2\)\): a tuple parameter needs a parser= from text"):
        Param((1, 2))

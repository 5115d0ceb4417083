"""Hydra's override grammar and sweep expansion (internal modules: Hydra offers no public API for them
outside its own app runner)."""

from __future__ import annotations

from typing import List, Sequence, Tuple


def parse_override(override: str):
    """Parse one command-line override with Hydra's grammar (raises HydraException)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override)


def sweep_elements(overrides: Sequence[str]) -> Tuple[list, List[List[str]]]:
    """(the parsed overrides, every element's override list): the cartesian product of the sweep
    overrides, in the order Hydra's basic sweeper runs them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return parsed, [list(element) for element in BasicSweeper.split_arguments(parsed, None)[0]]

"""Whether a request fits a cluster's nodes, by hand: each bundle on one node, all at once."""

from __future__ import annotations

import pytest

from spd_ray.capacity import _missing, can_place, describe


@pytest.mark.parametrize(
    ("bundles", "nodes", "fits"),
    [
        ([{"CPU": 1.0}] * 2, [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}], True),
        ([{"CPU": 1.0}] * 3, [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}], False),
        ([{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}], False),  # 2 CPUs in all, none on one node
        ([{"CPU": 0.5}] * 4, [{"CPU": 1.0}, {"CPU": 1.0}], True),
        ([{"CPU": 1.0, "GPU": 1.0}] * 2, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}], False),
        ([{"CPU": 1.0, "GPU": 1.0}] * 2, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0}], True),
        # largest first: the 3-CPU bundle must take the 3-CPU node, not be left for a 2-CPU one
        (
            [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 3.0}],
            [{"CPU": 2.0}, {"CPU": 3.0}, {"CPU": 1.0}],
            True,
        ),
        ([], [], True),
    ],
)
def test_can_place(
    bundles: list[dict[str, float]], nodes: list[dict[str, float]], fits: bool
) -> None:
    assert can_place(bundles, nodes) is fits


def test_can_place_leaves_the_nodes_it_was_given_alone() -> None:
    nodes = [{"CPU": 1.0}]
    assert can_place([{"CPU": 1.0}], nodes)
    assert nodes == [{"CPU": 1.0}]


def test_messages_count_what_is_asked_and_missing() -> None:
    bundles = [{"CPU": 1.0, "GPU": 1.0}] * 3
    assert describe(bundles) == "3 x {1 CPU, 1 GPU} (3 GPUs, 3 CPUs)"
    assert _missing(bundles, [{"CPU": 4.0, "GPU": 1.0}]) == "2 more GPUs"
    assert _missing([{"CPU": 1.0}] * 2, [{"CPU": 0.0}]) == "2 more CPUs"

"""The rules of result checks, without a swarm: schedule, tolerance, whom to ask."""

from __future__ import annotations

import random

import pytest
import torch

from brigade.client.config import ClientConfig
from brigade.client.verify.compare import (
    PRECISION_TOLERANCE,
    STRICTEST_TOLERANCE,
    WindowSchedule,
    choose_checker,
    disagreement,
    host_of,
    network_of,
    pair_tolerance,
    tolerance_of,
    valid_rows,
)
from brigade.protocol.records import PeerRecord


def record(name: str, address: str = "127.0.0.1:1", layers: tuple[int, int] = (0, 4), dtype: str = "float32",
           quantization: str = "none", state: str = "online") -> PeerRecord:
    return PeerRecord(peer_id=name, public_key="00", address=address, model_name="m", start_layer=layers[0],
                      end_layer=layers[1], num_layers=8, dtype=dtype, quantization=quantization, state=state,
                      signed_at=0.0)


# -- schedule ----------------------------------------------------------------------------------------
def test_stratified_schedule_checks_exactly_once_in_every_block() -> None:
    places = set()
    for seed in range(200):
        schedule = WindowSchedule(0.05, "stratified", random.Random(seed))
        due = [window for window in range(60) if schedule.due(window)]
        assert [window // 20 for window in due] == [0, 1, 2]
        places.add(due[0])
    assert len(places) > 15, "the checked window of a block must be random"


def test_random_schedule_is_memoryless_at_the_rate() -> None:
    schedule = WindowSchedule(0.05, "random", random.Random(0))
    share = sum(schedule.due(window) for window in range(20000)) / 20000
    assert 0.04 < share < 0.06


def test_rates_at_the_edges() -> None:
    assert not any(WindowSchedule(0.0).due(window) for window in range(100))
    assert all(WindowSchedule(1.0).due(window) for window in range(100))
    assert sum(WindowSchedule(0.5, rng=random.Random(1)).due(window) for window in range(100)) == 50
    with pytest.raises(ValueError):
        WindowSchedule(0.05, "sometimes")


# -- tolerance ---------------------------------------------------------------------------------------
def residual(seed: int = 0, rows: int = 16, size: int = 192) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, size, generator=generator) * 4
    return x, x + torch.randn(1, rows, size, generator=generator)  # a span adding ~half the input's norm


def test_honest_rounding_passes_and_noise_does_not() -> None:
    x, z = residual()
    valid = torch.ones(1, 16, dtype=torch.bool)
    assert disagreement(x, z, z, valid, 0.01) == 0.0
    rounded = z.to(torch.bfloat16).float()
    assert disagreement(x, rounded, z, valid, PRECISION_TOLERANCE["bfloat16"] + PRECISION_TOLERANCE["float32"]) < 0.3
    delta_rms = (z - x).pow(2).mean(-1, keepdim=True).sqrt()
    noisy = z + 0.2 * delta_rms * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    assert disagreement(x, noisy, z, valid, 2 * PRECISION_TOLERANCE["float32"]) > 5
    skipped = x  # the span did nothing
    assert disagreement(x, skipped, z, valid, PRECISION_TOLERANCE["bfloat16"] * 2) > 1


def test_a_cheater_cannot_widen_its_tolerance_by_inflating_its_output() -> None:
    x, z = residual()
    valid = torch.ones(1, 16, dtype=torch.bool)
    inflated = x + 10 * (z - x)
    assert disagreement(x, inflated, z, valid, 0.3) > 1


def test_one_bad_position_fails_the_window_and_padding_is_ignored() -> None:
    x, z = residual()
    y = z.clone()
    y[0, 3] += 5.0
    valid = valid_rows([0], 0, 16)
    assert disagreement(x, y, z, valid, 0.01) > 1
    assert disagreement(x, y, z, valid_rows([4], 0, 16), 0.01) == 0.0  # position 3 is padding there
    assert valid_rows([2, 0], 1, 4).tolist() == [[False, True, True], [True, True, True]]


def test_tolerance_by_precision() -> None:
    assert tolerance_of(record("a")) == PRECISION_TOLERANCE["float32"]
    assert tolerance_of(record("a", dtype="bfloat16"), scale=2) == 2 * PRECISION_TOLERANCE["bfloat16"]
    nf4 = record("a", quantization="nf4")
    assert tolerance_of(nf4) == PRECISION_TOLERANCE["float32"] + PRECISION_TOLERANCE["nf4"]
    assert tolerance_of(record("a", dtype="float8")) == STRICTEST_TOLERANCE  # a made-up name buys nothing


# -- whom to ask -------------------------------------------------------------------------------------
def test_addresses_and_networks() -> None:
    assert host_of("10.0.0.7:5000") == "10.0.0.7"
    assert host_of("[2001:db8::1]:5000") == "2001:db8::1"
    assert network_of("10.0.0.7") == network_of("10.0.0.200") != network_of("10.0.1.7")
    assert network_of("2001:db8:1:2::1") == network_of("2001:db8:1:ffff::9")
    assert network_of("Peer.Example.org") == "peer.example.org"


def choose(records: list[PeerRecord], suspect: PeerRecord, exclude: set[str] = frozenset(),
           busy: set[str] = frozenset(), seed: int = 0) -> str | None:
    chosen = choose_checker(records, (0, 4), [suspect], exclude, busy, tolerance_of, random.Random(seed))
    return None if chosen is None else chosen.peer_id


def test_checker_is_another_network_when_there_is_one() -> None:
    suspect = record("suspect", "10.0.0.1:1")
    same_host = record("same-host", "10.0.0.1:2")
    same_net = record("same-net", "10.0.0.9:1")
    away = record("away", "192.168.5.5:1", dtype="bfloat16")  # looser, but independent comes first
    assert choose([suspect, same_host, same_net, away], suspect) == "away"
    assert choose([suspect, same_host, same_net], suspect) == "same-net"
    assert choose([suspect, same_host], suspect) == "same-host"  # the same host still beats no check


def test_checker_must_serve_the_layers_and_be_usable() -> None:
    suspect = record("suspect")
    others = [record("partial", layers=(0, 2)), record("leaving", state="leaving"), record("banned"),
              record("elsewhere", layers=(4, 8))]
    assert choose([suspect, *others], suspect, exclude={"banned"}) is None
    assert choose([suspect, record("wide", layers=(0, 8)), *others], suspect, exclude={"banned"}) == "wide"


def test_checker_prefers_idle_then_precise_peers_and_draws_among_equals() -> None:
    suspect = record("suspect")
    on_route = record("on-route")
    nf4 = record("nf4", quantization="nf4")
    bf16 = record("bf16", dtype="bfloat16")
    assert choose([suspect, on_route, nf4, bf16], suspect, busy={"on-route"}) == "bf16"
    twins = [record("twin1"), record("twin2")]
    assert {choose([suspect, *twins], suspect, seed=seed) for seed in range(20)} == {"twin1", "twin2"}


def test_stratified_checks_add_unpredictable_ones_after_the_blocks_pick() -> None:
    """A peer that saw its block's read-back must not know the rest of the block is safe."""
    schedule = WindowSchedule(0.05, "stratified", random.Random(7), extra_rate=0.02)
    after_pick = 0
    for block in range(300):
        due = [offset for offset in range(20) if schedule.due(block * 20 + offset)]
        assert due, "the stratified pick is still there in every block"
        after_pick += len(due) - 1
    assert 60 <= after_pick <= 180  # about 2% of 6,000 windows, on top of one per block
    assert ClientConfig().verify_extra_rate > 0


def test_a_made_up_precision_buys_no_tolerance_and_two_nf4_peers_are_checked_tightly() -> None:
    float32, nf4 = record("a"), record("b", quantization="nf4")
    assert tolerance_of(record("c", quantization="nf3")) == STRICTEST_TOLERANCE
    assert tolerance_of(record("c", dtype="float64", quantization="nf4")) == STRICTEST_TOLERANCE
    assert tolerance_of(nf4) < 0.2  # it bought 0.3 (and an unknown token 0.3 more) before
    assert pair_tolerance(nf4, record("d", quantization="nf4")) < pair_tolerance(nf4, float32) / 2

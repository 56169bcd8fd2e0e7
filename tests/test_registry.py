"""Finding simulators by name, import path and entry point."""

from __future__ import annotations

import textwrap

import pytest
import torch

from sbipipe import SbipipeError, Simulator, available_simulators, get_simulator
from sbipipe import registry

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch.distributions import Independent, Normal

    class Coin:                      # duck-typed: no sbipipe base class
        parameter_names = ["bias"]
        prior = Independent(Normal(torch.zeros(1), torch.ones(1)), 1)
        def simulate(self, theta, generator=None):
            return theta + 0.1 * torch.randn(theta.shape, generator=generator)

    coin = Coin()

    def make_coin():
        return Coin()

    not_a_simulator = object()
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mysims.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mysims"


def test_builtins_listed():
    assert {"two_moons", "gaussian_linear", "slcp"} <= set(available_simulators())


@pytest.mark.parametrize("attr", ["coin", "Coin", "make_coin"])
def test_import_path_instance_class_or_factory(user_module, attr):
    sim = get_simulator(f"{user_module}:{attr}")
    assert isinstance(sim, Simulator)
    assert sim.parameter_names == ["bias"] and sim.observation_shape == (1,)
    assert sim.name in (f"{user_module}:{attr}", "coin")
    g = torch.Generator().manual_seed(0)
    assert sim.simulate(sim.sample_prior(4, g), g).shape == (4, 1)


def test_bad_specs(user_module):
    with pytest.raises(SbipipeError, match="unknown simulator 'nope'; known: .*two_moons"):
        get_simulator("nope")
    with pytest.raises(SbipipeError, match="cannot import module 'no_such_mod'"):
        get_simulator("no_such_mod:x")
    with pytest.raises(SbipipeError, match="has no attribute 'missing'"):
        get_simulator(f"{user_module}:missing")
    with pytest.raises(SbipipeError, match="is not a simulator: it lacks parameter_names, prior, simulate"):
        get_simulator(f"{user_module}:not_a_simulator")


def test_entry_point_plugins(monkeypatch, user_module):
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="coin_plugin", value=f"{user_module}:Coin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    assert "coin_plugin" in available_simulators()
    assert get_simulator("coin_plugin").name == "coin_plugin"

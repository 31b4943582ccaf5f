"""The Method interface (msrdarts.methods.base): a new method is one class, and the loop runs it.

The toy method below is what a user's own file would hold: it adds an architecture parameter of
its own, counts the steps it is called at, and derives its genotype from a fixed score table. The
one search loop runs it end to end, checkpoints its state, and resumes it, knowing nothing of it
by name.
"""

from dataclasses import replace

import pytest
import torch
from torch import nn

from msrdarts.config import SearchConfig
from msrdarts.errors import ConfigError
from msrdarts.genotype import num_edges
from msrdarts.methods import base
from msrdarts.methods.base import Derivation, Method, get_method, list_methods, register_method
from msrdarts.methods.derive import derive_genotype
from msrdarts.runs.folder import read_history
from msrdarts.runs.search import run_search

TINY = SearchConfig(dataset="digits", layers=3, channels=4, batch_size=256, epochs=2, lr=0.05, seed=0,
                    device="cpu", progress="off", plots=False, tensorboard=False, method="toy", spectral_norm=False)
PICTURES = ("cells", "curves", "scores", "trajectories-normal", "trajectories-reduce")


class Toy(Method):
    name = "toy"
    defaults = {"spectral_norm": False}
    score_key = "toy_score"

    @classmethod
    def validate(cls, cfg):
        if cfg.spectral_norm:
            raise ConfigError("--method toy: no spectral norms")

    def adapt(self, net):
        # its own architecture parameter: a fixed preference per (edge, op), op 2 everywhere
        pref = torch.zeros(2, num_edges(net.steps), len(net.primitives))
        pref[:, :, 2] = 1.0
        net.register_parameter("toy", nn.Parameter(pref, requires_grad=False))
        net.arch_parameter_names = ("toy",)
        self.steps = 0

    def new_epoch(self, epoch, fresh):
        self.epochs_started = getattr(self, "epochs_started", 0) + 1

    def step_hook(self, epoch_seed, start):
        def count(step, x, y):
            self.steps += 1
        return count

    def derive(self, net):
        table = net.toy.detach().cpu()
        return Derivation(table, derive_genotype(-table[0], -table[1], net.primitives, net.steps, net.multiplier))

    def state_dict(self):
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    register_method(Toy)
    yield


def test_registry_refuses_duplicates_and_names_unknown_methods(toy_registered):
    assert list_methods()[:2] == ["msr", "darts"] and "toy" in list_methods() and get_method("toy") is Toy
    with pytest.raises(ValueError, match="already registered"):
        register_method(Toy)
    with pytest.raises(ConfigError, match="--method='gdas': unknown; allowed: msr, darts, pc-darts, p-darts, toy"):
        get_method("gdas")


def test_the_loop_runs_a_new_method_with_its_parameters_checkpoint_and_resume(toy_registered, tmp_path):
    result = run_search(replace(TINY, plots=True), tmp_path / "run", log=lambda m: None)
    history = read_history(tmp_path / "run")
    # the views read the method's own score table: every picture of a search, from one file
    assert sorted({p.stem for p in (tmp_path / "run" / "plots").iterdir()}) == sorted(PICTURES)
    assert [r["epoch"] for r in history] == [1, 2] and "toy_score" in history[0]
    # op 2 of the MSR space wins every edge; ties between edges go to the lower source node
    assert all(op == "dil_conv_3x3" for op, _ in result.genotype.normal + result.genotype.reduce)
    assert [i for _, i in result.genotype.normal] == [0, 1, 0, 1, 0, 1, 0, 1]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    steps_per_epoch = -(-1150 // 256) - 1   # drop_last: 4 full batches of 256 of the 1,150 search-train images
    assert int(ckpt["arch_optimizer"]["steps"]) == 2 * steps_per_epoch
    assert torch.equal(ckpt["model"]["toy"][:, :, 2], torch.ones(2, 14))   # its parameter is in the weights
    # the weight optimiser never saw the method's parameter
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == sum(
        1 for k in ckpt["model"] if k != "toy" and not k.endswith(("running_mean", "running_var",
                                                                   "num_batches_tracked")))
    # a new run refuses changed settings it would have to bring in silently
    with pytest.raises(ConfigError, match="no spectral norms"):
        run_search(replace(TINY, spectral_norm=True), tmp_path / "other", log=lambda m: None)


class _Stop(Exception):
    pass


def test_a_resumed_run_restores_the_methods_state(toy_registered, tmp_path):
    def stop_after_1(epoch, record):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run_search(TINY, tmp_path / "run", log=lambda m: None, on_epoch_end=stop_after_1)
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    run_search(TINY, tmp_path / "run", resume=True, log=lambda m: None)
    again = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert int(again["arch_optimizer"]["steps"]) == 2 * int(first["arch_optimizer"]["steps"])

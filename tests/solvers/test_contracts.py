"""The model contract (solvers.contracts): what a model must have, the optional capabilities'
defaults in one place, stride's own models defining them, and the Stepper's StepOutput."""
import pytest
import torch

from stride_diffusion.solvers import (
    Denoiser,
    GaussianMixture,
    StepOutput,
    Stepper,
    contracts,
    make_table,
    seeded_noise,
)
from stride_diffusion.solvers.adapters import ADAPTERS, Adapter
from stride_diffusion.solvers.nets import unet_config
from stride_diffusion.solvers.network import Network
from stride_diffusion.solvers.schedules import FlowSchedule
from stride_diffusion.solvers.secant import SecantModel, SecantUNet


class Bare:
    """The least a model needs: the four attributes and the call."""
    schedule, param, num_classes, shape = FlowSchedule(), "flow", 2, (3,)

    def __call__(self, x, t, s, label):
        return torch.zeros_like(x)


def test_a_bare_model_gets_every_default_from_the_helpers():
    m = Bare()
    assert isinstance(m, Denoiser)
    contracts.check_model(m)
    assert contracts.guidance_input(m) is False and contracts.guidance_range(m) is None
    assert contracts.network(m) is None and contracts.input_dtype(m) is None
    assert contracts.device_of(m) == torch.device("cpu")
    assert contracts.device_of(m, "meta") == torch.device("meta")


def test_a_model_missing_part_of_the_contract_is_refused_by_name():
    class NoShape:
        schedule, param, num_classes = FlowSchedule(), "flow", 2

        def __call__(self, x, t, s, label):
            return x

    with pytest.raises(TypeError, match=r"NoShape is not a model: it lacks attributes \['shape'\]"):
        Stepper(NoShape(), window=1)


def test_guidance_range_only_for_a_model_with_a_guidance_input():
    class Ranged(Bare):
        guidance_input, guidance_range = False, (1, 4)

    assert contracts.guidance_range(Ranged()) is None  # a range without the input means nothing
    Ranged.guidance_input = True
    assert contracts.guidance_range(Ranged()) == (1.0, 4.0)


def test_strides_own_models_define_the_capabilities_explicitly():
    gmm = GaussianMixture.random(FlowSchedule(), "flow", num_classes=2, per_class=1, dim=4, seed=0)
    net = SecantUNet(unet_config({"channels": 8, "channel_mult": [1], "num_res_blocks": 1, "emb_dim": 16,
                                  "num_heads": 1, "num_classes": 2, "image_size": 4, "in_channels": 1}), (1.0, 3.0))
    sec = SecantModel(net, (1, 4, 4), 2)
    models = [gmm, sec, Network(gmm), *ADAPTERS.values(), Adapter]
    for m in models:
        for k in ("guidance_input", "guidance_range"):
            assert k in dir(m), (m, k)
    for m in (gmm, sec, Network(gmm)):
        assert "net" in dir(m) and isinstance(m, Denoiser)
    assert sec.guidance_input and sec.guidance_range == (1.0, 3.0) and contracts.network(sec) is net
    wrapped = Network(sec)
    assert wrapped.guidance_input and wrapped.guidance_range == (1.0, 3.0) and wrapped.net is net


def test_pop_done_batch_returns_a_step_output():
    gmm = GaussianMixture.random(FlowSchedule(), "flow", num_classes=2, per_class=1, dim=4, seed=0)
    st = Stepper(gmm, window=1)
    st.add([make_table("euler", gmm.schedule, "flow", 1), make_table("euler", gmm.schedule, "flow", 2)],
           seeded_noise([0, 1], gmm.shape), [0, 1], 1.0, ids=["a", "b"])
    none = st.pop_done_batch()
    assert isinstance(none, StepOutput) and none.ids == [] and none.states.shape == (0, 4)
    st.step()
    done = st.pop_done_batch()
    assert done.ids == ["a"] and done.states.shape == (1, 4)
    ids, states = done  # still unpacks
    assert ids == ["a"] and states is done.states

import torch
import zuko

from sbipipe.activations import Tanh, tanh, tanh_
from sbipipe.autoregressive import MAF
from sbipipe.estimators import ACTIVATIONS


def test_tanh_from_the_sigmoid_equals_torchs_with_its_gradient():
    x = torch.cat([torch.linspace(-30, 30, 20_001, dtype=torch.float64), torch.tensor([float("inf"), -float("inf")])])
    exact = torch.tanh(x)
    torch.testing.assert_close(tanh(x), exact, rtol=0, atol=1e-15)
    torch.testing.assert_close(tanh(x.float()), exact.float(), rtol=0, atol=2.5e-7)
    assert tanh(torch.tensor([float("nan")])).isnan().all()
    inplace = x.clone()
    assert tanh_(inplace) is inplace
    torch.testing.assert_close(inplace, exact, rtol=0, atol=1e-15)
    # where autograd records, torch's own tanh (and its gradient) runs, in place too
    leaf = (torch.randn(50, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(tanh, (leaf,)) and tanh(leaf).equal(torch.tanh(leaf))
    assert torch.autograd.gradcheck(lambda v: tanh_(v * 1), (leaf,))
    assert ACTIVATIONS["tanh"] is Tanh and Tanh()(x).equal(tanh(x))


def test_maf_with_the_fast_tanh_is_zukos_maf_with_torchs():
    torch.manual_seed(0)
    kwargs = {"transforms": 3, "hidden_features": (32, 32), "passes": 2}
    ours = MAF(4, 3, activation=Tanh, **kwargs).double()
    theirs = zuko.flows.MAF(4, 3, activation=torch.nn.Tanh, **kwargs).double()
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    theta, x = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x).log_prob(theta), theirs(x).log_prob(theta), rtol=0, atol=1e-10)
    z = torch.randn(100, 1, 4, generator=g, dtype=torch.float64)  # draws: the in-place tanh of the coupling inverse
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:1]).transform.inv(z), theirs(x[:1]).transform.inv(z), rtol=0, atol=1e-10)
    # reparametrised draws keep their gradient through the coupling inverse
    draws, log_q = ours(x[:2]).rsample_and_log_prob((10,))
    (draws.sum() + log_q.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())

"""The SAM family under the real PyTorch Lightning Trainer (automatic optimization, as its users run it):
bit for bit the hand-written ``step(closure)`` loop, an LR scheduler driving GSAM's rho, LookSAM's
reuse steps running the clean pass only, and a Lightning checkpoint resuming the persistent state
(LookSAM's gv and counter, FriendlySAM's running mean) bit-identically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("pytorch_lightning")

import fastperturb as fp  # noqa: E402
from fastperturb.integrations.lightning import PerturbLightningModule  # noqa: E402

from test_integrations_lightning import BATCH, N, assert_same, loader, make_net, make_sched, trainer  # noqa: E402

FAMILY = {
    "GSAM": lambda p: fp.GSAM(p, torch.optim.SGD, rho_max=0.1, rho_min=0.02, alpha=0.4, lr=0.1, momentum=0.9),
    "WSAM": lambda p: fp.WSAM(p, torch.optim.SGD, rho=0.05, gamma=0.8, lr=0.1, momentum=0.9),
    "LookSAM": lambda p: fp.LookSAM(p, torch.optim.SGD, rho=0.05, k=3, lr=0.1, momentum=0.9),
    "FriendlySAM": lambda p: fp.FriendlySAM(p, torch.optim.SGD, rho=0.05, sigma=0.5, lr=0.1, momentum=0.9),
}


class Net(PerturbLightningModule):
    def __init__(self, preset: str):
        super().__init__()
        self.net = make_net()
        self.preset = preset
        self.passes = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.passes.append(self.perturb_pass)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = FAMILY[self.preset](self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_sched(opt), "interval": "step"}}


def hand_loop(preset: str, epochs: int = 1):
    net = make_net()
    opt = FAMILY[preset](net.parameters())
    sched = make_sched(opt)
    for _ in range(epochs):
        for x, y in loader():

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            sched.step()
    return net


@pytest.mark.parametrize("preset", list(FAMILY))
def test_trains_like_the_hand_written_loop(preset, tmp_path):
    model = Net(preset)
    trainer(tmp_path).fit(model, loader())
    assert_same(model.net, hand_loop(preset))
    assert N // BATCH == 4
    if preset == "LookSAM":  # k=3: refresh at t=0 and 3, reuse (the clean pass only) at t=1, 2
        assert model.passes == [0, 1, 0, 0, 0, 1]
    else:
        assert model.passes == [0, 1] * 4


@pytest.mark.parametrize("preset", ["LookSAM", "FriendlySAM"])
def test_lightning_checkpoint_resumes_the_persistent_state(preset, tmp_path):
    full = Net(preset)
    trainer(tmp_path / "full", max_epochs=2).fit(full, loader())
    first = Net(preset)
    t1 = trainer(tmp_path / "a", max_epochs=1)
    t1.fit(first, loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = Net(preset)
    t2 = trainer(tmp_path / "b", max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert_same(resumed.net, full.net)
    if preset == "LookSAM":  # 8 steps: the resumed run continued the counter (and reused the saved gv)
        assert t2.optimizers[0].looksam_step == full.trainer.optimizers[0].looksam_step == 2 * (N // BATCH)

import torch

from speedlm.train import build_optimizer, param_groups


def test_no_weight_decay_on_1d_params(make_model):
    model = make_model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    for group in opt.param_groups:
        for p in group["params"]:
            if p.dim() < 2:
                assert group["weight_decay"] == 0.0
            else:
                assert group["weight_decay"] == 0.1
    one_d = [p for p in model.parameters() if p.dim() < 2]
    assert one_d, "the model should have norm gains"


def test_every_param_once_with_tied_embedding(make_model):
    model = make_model()
    assert model.lm_head.weight is model.embed.weight
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()


def test_step_changes_weights(make_model):
    model = make_model()
    opt = build_optimizer(model, lr=1e-2)
    before = model.embed.weight.detach().clone()
    x = torch.randint(0, 64, (2, 8))
    model.loss(x, x).total.backward()
    opt.step()
    assert not torch.equal(before, model.embed.weight)

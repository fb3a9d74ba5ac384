"""timm backbones (``model.backbone: timm:NAME``): a plain ViT through the simple feature
pyramid, a hierarchical network through timm's feature extraction, local weights only, input
sizes checked when the model is built, and the seed-000 pair (a ViT-backbone teacher with one
neck, a CNN-backbone student with another) in one ``kdet check``. Tiny networks, no download."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

timm = pytest.importorskip("timm")

from kdet.cli import main  # noqa: E402
from kdet.config import ModelConfig  # noqa: E402
from kdet.engine.checkpoint import load_detector, model_payload, save_atomic  # noqa: E402
from kdet.engine.export import export_onnx  # noqa: E402
from kdet.models import build_model  # noqa: E402
from kdet.models.timm_backbone import TimmBackbone  # noqa: E402
from conftest import distil_one_step, kd_terms  # noqa: E402

CLASSES = ["bar", "square"]
VIT = {"backbone": "timm:vit_tiny_patch16_224", "backbone_args": {"depth": 1, "embed_dim": 32, "num_heads": 2}}
CONVNEXT = {"backbone": "timm:convnext_atto", "backbone_args": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}}


def build(family="yolo", spec=VIT, size=64, **fields):
    torch.manual_seed(0)
    config = ModelConfig(family=family, size="p", anchors="default", fpn_channels=64, **{**spec, **fields})
    return build_model(config, CLASSES, size)


@pytest.mark.parametrize("family", ["yolo", "fcos"])
@pytest.mark.parametrize("spec", [VIT, CONVNEXT], ids=["vit", "convnext"])
def test_timm_backbones_give_strides_8_16_32_losses_and_gradients(family, spec):
    model = build(family, spec)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = model(images, targets)
    for name, stride in zip(("c3", "c4", "c5"), (8, 16, 32)):
        feature = out.features[f"backbone.{name}"]
        assert feature.stride == stride and tuple(feature.tensor.shape[-2:]) == (64 // stride,) * 2
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        detections = model(images, decode=True).detections
    assert len(detections) == 2


def test_plain_vit_goes_through_the_simple_feature_pyramid_with_its_own_normalisation():
    model = build()
    assert model.backbone.plain and model.backbone.pyramid is not None
    assert model.backbone.channels == [32, 32, 32]
    # the ViT's own input normalisation (mean 0.5, std 0.5), not ImageNet's
    assert torch.allclose(model.pixel_mean.flatten(), torch.full((3,), 0.5))
    hierarchical = build(spec=CONVNEXT)
    assert not hierarchical.backbone.plain and hierarchical.backbone.channels == [16, 32, 64]


CNN = {"backbone": "cspdarknet"}


@pytest.mark.parametrize(("teacher", "student", "losses"), [
    (("fcos", VIT, {}), ("yolo", CNN, {}), ("objectness_scaled", "pkd")),  # seed 000's direction
    (("yolo", CNN, {"head": "dfl"}), ("yolo", VIT, {"head": "dfl"}), ("ld", "soft_bce", "pkd")),
    (("yolo", CONVNEXT, {}), ("fcos", VIT, {}), ("objectness_scaled", "cwd")),
], ids=["vit-teacher", "vit-student", "convnext-teacher-vit-student"])
def test_timm_backbones_distil_as_teacher_and_as_student(teacher, student, losses):
    (t_family, t_spec, t_fields), (s_family, s_spec, s_fields) = teacher, student
    terms = distil_one_step(build(t_family, t_spec, **t_fields), build(s_family, s_spec, **s_fields), kd_terms(*losses))
    assert {f"kd{i}_{name}" for i, name in enumerate(losses)} <= set(terms)


@pytest.mark.parametrize(("family", "spec"), [("yolo", VIT), ("fcos", CONVNEXT)], ids=["yolo-vit", "fcos-convnext"])
def test_timm_backbone_models_export_to_onnx_matching_pytorch(family, spec, tmp_path):
    model = build(family, spec).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, 64, tmp_path / "model.onnx", dynamic_batch=True, verify_with=images)
    assert report.max_box_diff <= 1e-2 and report.max_score_diff <= 1e-4


def network_file(tmp_path, spec, **changes):
    """The whole timm network (classifier included) saved as a weights file, as timm would."""
    args = {**spec["backbone_args"], **changes}
    torch.manual_seed(1)
    network = timm.create_model(spec["backbone"].split(":", 1)[1], pretrained=False, **args)
    path = tmp_path / "backbone.pth"
    torch.save(network.state_dict(), path)
    return path, network


@pytest.mark.parametrize("spec", [VIT, CONVNEXT], ids=["vit", "convnext"])
def test_local_weights_load_completely_or_are_refused(tmp_path, spec):
    path, network = network_file(tmp_path, spec)
    model = build(spec=spec, pretrained_backbone=str(path))
    own = model.backbone.network.state_dict()
    assert own and all(torch.equal(value, network.state_dict()[key]) for key, value in own.items())

    wrong, _ = network_file(tmp_path, spec, **({"embed_dim": 48} if spec is VIT else {"dims": [8, 16, 32, 96]}))
    with pytest.raises(ValueError, match="does not fit the model"):
        build(spec=spec, pretrained_backbone=str(wrong))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build(spec=spec, pretrained_backbone=str(tmp_path / "missing.pth"))


def test_input_sizes_the_network_cannot_take_are_refused_at_build_time():
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        TimmBackbone("vit_tiny_patch16_224", input_size=72, args=VIT["backbone_args"])
    with pytest.raises(ValueError, match="cannot take data.input_size 64"):
        build(spec={"backbone": "timm:swin_tiny_patch4_window7_224",
                    "backbone_args": {"depths": [1, 1, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 1, 1], "img_size": 224}})
    with pytest.raises(ValueError, match="patches of 14 px"):
        TimmBackbone("vit_small_patch14_dinov2", input_size=224, args={"depth": 1, "embed_dim": 32, "num_heads": 2})
    with pytest.raises(ValueError, match="Did you mean timm:vit_tiny_patch16_224"):
        build(spec={"backbone": "timm:vit_tiny_patch16_22"})
    with pytest.raises(ValueError, match="backbone_args is for timm backbones"):
        build(spec={"backbone": "cspdarknet", "backbone_args": {"depth": 1}})


def test_missing_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match=r"pip install 'kdet\[timm\]'"):
        build()


def test_checkpoint_round_trip(tmp_path):
    model = build().eval()
    path = tmp_path / "best.pt"
    config = ModelConfig(family="yolo", size="p", anchors="default", **VIT)
    save_atomic(model_payload(model, config, 64), path)
    loaded, _ = load_detector(path, log=lambda _: None)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images).head[0].cls_logits, loaded(images).head[0].cls_logits)


def test_seed_000_vit_teacher_and_cnn_student_pair_in_one_check(shapes_voc, tmp_path, capsys):
    """Seed 000: a ViT-backbone teacher with one neck (FCOS's FPN, five levels) and a CNN student
    with another (the PAN, three levels): kdet check explains the necks and pairs what it can."""
    teacher = build("fcos", VIT)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    config = {
        "data": {"path": str(shapes_voc), "input_size": 64, "workers": 0},
        "model": {"family": "yolo", "backbone": "cspdarknet", "size": "p", "anchors": "default"},
        "teacher": {"model": {"family": "fcos", "fpn_channels": 64, **VIT}, "weights": str(tmp_path / "teacher.pt")},
        "distill": {"terms": [{"loss": "objectness_scaled"}, {"loss": "pkd", "student": "neck"},
                              {"loss": "fitnet", "student": "neck.p3", "teacher": "neck.p4"}]},
    }
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "necks differ: the teacher's neck gives 5 level(s) (p3 /8 64 ch" in text
    assert "the student's 3 (p3 /8 32 ch, p4 /16 64 ch, p5 /32 128 ch)" in text
    assert "p6, p7 have no partner of their stride and are left out" in text
    assert "levels paired by stride: p3<-p3, p4<-p4, p5<-p5" in text  # the response term
    assert "where channels differ, feature terms bridge them with connectors" in text
    assert "neck.p3 (32 ch) -> a learned 1x1 conv -> 64 ch vs teacher neck.p3" in text  # pkd
    assert "ERROR: distill.terms.2 (fitnet): student neck.p3 is 8x8 (stride 8), teacher neck.p4 is 4x4" in text
    config["distill"]["terms"].pop()
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path)]) == 0
    assert "pairing: OK" in capsys.readouterr().out

"""Multi-scale deformable attention: parity with Hugging Face's Deformable DETR, sampling, masks, init, ONNX export."""

import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from polyformer import MultiScaleDeformableAttention
from polyformer.deformable import multi_scale_deformable_sampling

TOL = dict(atol=1e-5, rtol=0)
LEVEL_SHAPES = {"four levels": [(8, 10), (4, 5), (2, 3), (1, 2)], "three levels": [(7, 7), (3, 5), (1, 1)]}


def reference_points(b: int, q: int, levels: int, coordinates: int) -> torch.Tensor:
    """(b q L 2) points or (b q L 4) boxes with sides in [0.05, 0.5], inside [0, 1]."""
    centres = torch.rand(b, q, levels, 2)
    if coordinates == 2:
        return centres
    return torch.cat((centres, 0.05 + 0.45 * torch.rand(b, q, levels, 2)), dim=-1)


def padding(b: int, m: int) -> torch.Tensor:
    """(b m) True at padding: a different tail of each sample's values."""
    return torch.arange(m)[None, :] >= torch.tensor([m - 3 * i for i in range(b)])[:, None]


def hugging_face_attention(dim: int, heads: int, levels: int, points: int) -> nn.Module:
    """Hugging Face's module in its pure-PyTorch path (custom kernels off), every parameter random and non-zero."""
    modeling = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
    config = modeling.DeformableDetrConfig(d_model=dim, num_feature_levels=levels, disable_custom_kernels=True)
    theirs = modeling.DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=points).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():  # the default init zeroes the offset weights: randomise everything
            parameter.normal_(0.0, 0.5)
    return theirs


def hugging_face_forward(theirs: nn.Module, query, reference, value, shapes, value_padding_mask):
    """Their forward with only the keywords this transformers version takes; their attention_mask is True at real
    values (they fill ~attention_mask with zeros), the inverse of our value_padding_mask."""
    shapes_tensor = torch.tensor(shapes, dtype=torch.long)
    level_start = torch.cat((shapes_tensor.new_zeros(1), shapes_tensor.prod(dim=1).cumsum(dim=0)[:-1]))
    arguments = dict(hidden_states=query, encoder_hidden_states=value, reference_points=reference,
                     attention_mask=None if value_padding_mask is None else ~value_padding_mask,
                     spatial_shapes=shapes_tensor, spatial_shapes_list=shapes, level_start_index=level_start)
    taken = inspect.signature(theirs.forward).parameters
    return theirs(**{name: given for name, given in arguments.items() if name in taken})[0]


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding mask"])
@pytest.mark.parametrize("coordinates", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("shapes", LEVEL_SHAPES.values(), ids=LEVEL_SHAPES.keys())
def test_matches_hugging_face_deformable_detr(shapes, coordinates, masked):
    torch.manual_seed(0)
    dim, heads, points, levels = 32, 4, 3, len(shapes)
    theirs = hugging_face_attention(dim, heads, levels, points)
    ours = MultiScaleDeformableAttention(dim, heads=heads, levels=levels, points=points).eval()
    ours.load_state_dict(theirs.state_dict())  # the same names: strict load
    b, q, m = 3, 11, sum(h * w for h, w in shapes)
    query, value = torch.randn(b, q, dim), torch.randn(b, m, dim)
    reference = reference_points(b, q, levels, coordinates)
    mask = padding(b, m) if masked else None
    with torch.no_grad():
        expected = hugging_face_forward(theirs, query, reference, value, shapes, mask)
        found = ours(query, reference, value, shapes, value_padding_mask=mask)
    assert found.shape == (b, q, dim)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not of two near-zero outputs
    torch.testing.assert_close(found, expected, **TOL)


def test_sampling_reads_pixel_centres_interpolates_between_them_and_is_zero_outside():
    torch.manual_seed(0)
    shapes, b, h, e = [(3, 4), (2, 1), (1, 1)], 2, 2, 5  # level starts in the values: 0, 12, 14
    value = torch.randn(b, 15, h, e)
    reads = [  # (level, (x, y)) read by each query with weight 1
        (0, ((2 + 0.5) / 4, (1 + 0.5) / 3)),  # the centre of pixel (row 1, column 2)
        (1, (0.5, 0.75)),  # the centre of pixel (row 1, column 0)
        (2, (0.5, 0.5)),  # the centre of the 1×1 map
        (0, (2 / 4, (1 + 0.5) / 3)),  # halfway between columns 1 and 2 of row 1
        (0, (-0.5, 1.5)),  # outside the map
    ]
    locations = torch.zeros(b, len(reads), h, 3, 1, 2)
    weights = torch.zeros(b, len(reads), h, 3, 1)
    for query, (level, xy) in enumerate(reads):
        locations[:, query, :, level, 0] = torch.tensor(xy)
        weights[:, query, :, level, 0] = 1.0
    out = multi_scale_deformable_sampling(value, shapes, locations, weights).view(b, len(reads), h, e)
    expected = [value[:, 6], value[:, 13], value[:, 14], (value[:, 5] + value[:, 6]) / 2, torch.zeros(b, h, e)]
    torch.testing.assert_close(out, torch.stack(expected, dim=1), **TOL)


def test_borders_and_a_one_by_one_level_give_finite_outputs_and_gradients():
    torch.manual_seed(0)
    shapes = [(5, 6), (1, 1)]
    attention = MultiScaleDeformableAttention(16, heads=2, levels=2, points=4)
    corners = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5]])  # on the maps' edges and corners
    query = torch.randn(1, 4, 16, requires_grad=True)
    value = torch.randn(1, 31, 16, requires_grad=True)
    for reference in (corners[None, :, None].expand(1, 4, 2, 2), torch.cat((corners, corners), -1)[None, :, None]
                      .expand(1, 4, 2, 4)):
        out = attention(query, reference, value, shapes)
        out.sum().backward()
        assert out.shape == (1, 4, 16) and torch.isfinite(out).all()
        assert torch.isfinite(query.grad).all() and torch.isfinite(value.grad).all()


def test_padded_values_do_not_change_the_output():
    torch.manual_seed(0)
    shapes = [(6, 6), (3, 3), (2, 2)]
    attention = MultiScaleDeformableAttention(16, heads=2, levels=3, points=2).eval()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0.0, 0.5)
    m = sum(h * w for h, w in shapes)
    query, value, reference = torch.randn(2, 7, 16), torch.randn(2, m, 16), torch.rand(2, 7, 3, 2)
    mask = padding(2, m) | (torch.rand(2, m) < 0.3)
    changed = torch.where(mask[..., None], 100 * torch.randn(2, m, 16), value)
    with torch.no_grad():
        out = attention(query, reference, value, shapes, value_padding_mask=mask)
        torch.testing.assert_close(attention(query, reference, changed, shapes, value_padding_mask=mask), out,
                                   atol=0, rtol=0)
        assert not torch.allclose(attention(query, reference, value, shapes), out)  # the mask does act


def test_initialisation_is_the_originals():
    attention = MultiScaleDeformableAttention(32, heads=8, levels=2, points=3)
    directions = torch.tensor([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
                              dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.arange(1, 4.0)[None, None, :, None]  # (h 1 p 2)
    torch.testing.assert_close(attention.sampling_offsets.bias.view(8, 2, 3, 2), expected.expand(8, 2, 3, 2),
                               atol=1e-6, rtol=1e-6)
    assert not attention.sampling_offsets.weight.any()
    assert not attention.attention_weights.weight.any() and not attention.attention_weights.bias.any()
    bound = math.sqrt(6 / (32 + 32))  # Xavier uniform
    for projection in (attention.value_proj, attention.output_proj):
        assert projection.weight.abs().max() <= bound and projection.weight.std() > bound / 4
        assert not projection.bias.any()


@pytest.mark.parametrize("problem, call, message", [
    ("heads", lambda: MultiScaleDeformableAttention(30, heads=4), "dim=30 must be divisible by heads=4"),
    ("sizes", lambda: MultiScaleDeformableAttention(16, heads=2, levels=2)(
        torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 20, 16), [(4, 4), (2, 3)]),
     r"must equal the value tokens m = 20, found 22"),
    ("levels", lambda: MultiScaleDeformableAttention(16, heads=2, levels=2)(
        torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 16, 16), [(4, 4)]),
     r"expected 2 levels of \(H, W\), found 1"),
    ("reference levels", lambda: MultiScaleDeformableAttention(16, heads=2, levels=2)(
        torch.randn(1, 3, 16), torch.rand(1, 3, 1, 2), torch.randn(1, 17, 16), [(4, 4), (1, 1)]),
     r"reference_points: expected \(b, q, levels=2, 2 or 4\), found \(1, 3, 1, 2\)"),
    ("coordinates", lambda: MultiScaleDeformableAttention(16, heads=2, levels=2)(
        torch.randn(1, 3, 16), torch.rand(1, 3, 2, 3), torch.randn(1, 17, 16), [(4, 4), (1, 1)]),
     r"reference_points: expected \(b, q, levels=2, 2 or 4\), found \(1, 3, 2, 3\)"),
    ("mask", lambda: MultiScaleDeformableAttention(16, heads=2, levels=2)(
        torch.randn(1, 3, 16), torch.rand(1, 3, 2, 2), torch.randn(1, 17, 16), [(4, 4), (1, 1)],
        torch.zeros(1, 16, dtype=torch.bool)), r"value_padding_mask: expected \(b, m=17\), found \(1, 16\)"),
    ("sampling levels", lambda: multi_scale_deformable_sampling(
        torch.randn(1, 17, 2, 4), [(4, 4), (1, 1)], torch.rand(1, 3, 2, 3, 2, 2), torch.rand(1, 3, 2, 3, 2)),
     r"expected 3 levels of \(H, W\), found 2"),
])
def test_bad_input_is_a_value_error_naming_it(problem, call, message):
    with pytest.raises(ValueError, match=message):
        call()


class FixedLevels(nn.Module):
    """The attention over fixed level shapes with tensors only as inputs, as a detector exports it."""

    def __init__(self, attention: MultiScaleDeformableAttention, shapes: list[tuple[int, int]]):
        super().__init__()
        self.attention, self.shapes = attention, shapes

    def forward(self, query, reference, value, value_padding_mask):
        return self.attention(query, reference, value, self.shapes, value_padding_mask)


def test_onnx_export_with_a_dynamic_batch_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    shapes = [(6, 7), (3, 4), (2, 2), (1, 1)]
    m = sum(h * w for h, w in shapes)
    attention = MultiScaleDeformableAttention(16, heads=2, levels=4, points=2).eval()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_(0.0, 0.5)
    model = FixedLevels(attention, shapes).eval()

    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        return torch.randn(b, 5, 16), reference_points(b, 5, 4, 4), torch.randn(b, m, 16), torch.rand(b, m) < 0.2

    names = ["query", "reference_points", "value", "value_padding_mask"]
    exported = torch.onnx.export(model, inputs(2), dynamo=True, opset_version=17, input_names=names,
                                 dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in names), verbose=False)
    proto = exported.model_proto
    assert [opset.version for opset in proto.opset_import if opset.domain in ("", "ai.onnx")] == [17]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        example = inputs(b)
        (found,) = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, example)})
        with torch.no_grad():
            expected = model(*example).numpy()
        assert found.shape == (b, 5, 16) and np.abs(found - expected).max() <= 1e-4

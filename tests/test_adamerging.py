"""AdaMerging's task-by-task gradient accumulation is the reference's all-graphs-alive step."""
import copy

import open_clip
import pytest
import torch

from pipeline.merging.methods.adamerging import GRAPH_INPUTS, MergeCoefficients, step, step_all_graphs, task_groups


def tiny_setup(layer_wise: bool):
    torch.manual_seed(0)
    encoder = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 16, "width": 16, "layers": 1, "head_width": 8,
                                                       "patch_size": 8},
                             text_cfg={"width": 16, "layers": 1, "heads": 2, "context_length": 8,
                                       "vocab_size": 32}).visual.eval()
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    vectors = [{k: 0.05 * torch.randn_like(v) for k, v in pretrained.items()} for _ in range(3)]
    coeffs = MergeCoefficients(pretrained, vectors, layer_wise=layer_wise, init=0.3)
    heads = [torch.randn(c, 16) for c in (4, 5, 6)]
    batches = [torch.randn(6, 3, 16, 16) for _ in range(3)]
    return encoder, coeffs, heads, batches


@pytest.mark.parametrize("graph_inputs", [0, GRAPH_INPUTS], ids=["task_by_task", "small_tasks_share_a_graph"])
@pytest.mark.parametrize("layer_wise", [False, True])
def test_task_by_task_gradient_equals_the_all_graphs_gradient(layer_wise, graph_inputs):
    encoder, coeffs, heads, batches = tiny_setup(layer_wise)
    other = copy.deepcopy(coeffs)
    loss = step(encoder, coeffs, heads, batches, graph_inputs=graph_inputs)
    reference = step_all_graphs(encoder, other, heads, batches)
    assert loss == pytest.approx(reference, rel=1e-6)
    assert coeffs.lambdas.grad.abs().sum() > 0
    torch.testing.assert_close(coeffs.lambdas.grad, other.lambdas.grad, rtol=1e-5, atol=1e-7)


def test_small_tasks_share_a_graph_and_real_size_tasks_get_one_each():
    """The world's 32 px batches go through one forward; 224 px ones keep memory to one task's graph."""
    small = [torch.zeros(32, 3, 32, 32) for _ in range(8)]
    real = [torch.zeros(32, 3, 224, 224) for _ in range(8)]
    assert task_groups(small) == [list(range(8))]
    assert task_groups(real) == [[t] for t in range(8)]
    assert task_groups(small, graph_inputs=0) == [[t] for t in range(8)]
    assert task_groups(small, graph_inputs=3 * small[0].numel()) == [[0, 1, 2], [3, 4, 5], [6, 7]]

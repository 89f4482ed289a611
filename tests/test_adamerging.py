"""AdaMerging's task-by-task gradient accumulation is the reference's all-graphs-alive step, and
tasks share a graph as far as the memory holds them."""
import copy

import open_clip
import pytest
import torch

from pipeline.merging.methods.adamerging import (GRAPH_INPUTS, Grouping, MergeCoefficients, at_precision, step,
                                                 step_all_graphs, task_groups)


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
    loss = step(encoder, coeffs, heads, batches, Grouping(graph_inputs=graph_inputs))
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


class FakeMemory:
    """A device with `free` bytes, on which a forward and backward peaks at `per_input` bytes per input value."""

    def __init__(self, free: int, per_input: float):
        self.free_bytes, self.per_input, self.started = free, per_input, 0

    def free(self) -> int:
        return self.free_bytes

    def start(self) -> None:
        self.started += 1

    def peak(self) -> int:
        return int(self.per_input * self.measured_inputs)


@pytest.mark.parametrize("fits", [8, 3, 1])
def test_on_a_gpu_tasks_share_graphs_as_far_as_the_free_memory_holds_them(fits):
    """The first step goes task by task and measures one task's graph; later ones group as many
    tasks as the free memory (with its headroom) holds: all of them where they fit."""
    batches = [torch.zeros(32, 3, 224, 224) for _ in range(8)]
    one_task = batches[0].numel() * 100.0  # bytes of one task's graph
    memory = FakeMemory(free=int(fits * one_task / Grouping.HEADROOM) + 1, per_input=100.0)
    grouping = Grouping(memory=memory)
    first = grouping(batches)
    assert first == [[t] for t in range(8)]
    memory.measured_inputs = batches[0].numel()
    with grouping.measuring(first[0], batches):
        pass
    assert grouping.bytes_per_input == pytest.approx(100.0, rel=1e-6)
    assert grouping(batches) == [list(range(t, min(t + fits, 8))) for t in range(0, 8, fits)]
    with grouping.measuring([0], batches):  # measured once
        pass
    assert memory.started == 1


@pytest.mark.parametrize("name", ["tf32", "bf16"])
def test_lower_precision_steps_keep_the_float32_gradients_direction(name):
    """TF32 (CUDA's; float32 on a CPU) and bf16 autocast change the arithmetic, not the step: the
    coefficients' gradient stays close to float32's (docs/benchmark.md measures the effect on
    learned coefficients and accuracy)."""
    encoder, coeffs, heads, batches = tiny_setup(layer_wise=True)
    other = copy.deepcopy(coeffs)
    step(encoder, coeffs, heads, batches)
    with at_precision(name, torch.device("cpu")):
        step(encoder, other, heads, batches)
    assert torch.nn.functional.cosine_similarity(coeffs.lambdas.grad.flatten(), other.lambdas.grad.flatten(), dim=0) > 0.99
    assert not torch.backends.cuda.matmul.allow_tf32  # restored

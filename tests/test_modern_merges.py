"""TSV-M, Iso-C, Iso-CTS, WUDI and Consensus Task Arithmetic: their maths on small cases whose
answer is known by hand, and each method against a literal transcription of its authors' code
(TSV @a6c9718 src/utils/TSVM_utils.py, iso-merging @d34010a src/utils/iso.py, WUDI-Merging
@dc3cd12 vit/wudi_main.py, tall_masks @d10af8b src/utils/tallmask_utils.py), in float64."""
import pytest
import torch

from pipeline.merging import registry
from pipeline.merging.inputs import MergeInputs
from pipeline.merging.methods.consensus_task_arithmetic import tall_masks
from pipeline.merging.methods.iso_c import isotropic
from pipeline.merging.methods.iso_cts import iso_cts_matrix, subspace_sizes
from pipeline.merging.methods.tsv_merging import tsv_matrix
from pipeline.merging.methods.wudi_merging import wudi_matrix

KEYS = {  # an open_clip image tower's tensor kinds (one block), small
    "conv1.weight": (8, 3, 4, 4), "class_embedding": (8,), "positional_embedding": (5, 8), "ln_pre.weight": (8,),
    "transformer.resblocks.0.attn.in_proj_weight": (24, 8), "transformer.resblocks.0.attn.in_proj_bias": (24,),
    "transformer.resblocks.0.attn.out_proj.weight": (8, 8), "transformer.resblocks.0.mlp.c_fc.weight": (32, 8),
    "transformer.resblocks.0.mlp.c_proj.weight": (8, 32), "proj": (8, 6)}
# the layers WUDI's authors' code merges (vit/wudi_main.py): the blocks' linear weights by name
LINEAR = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def inputs(n_tasks: int = 3, seed: int = 0) -> MergeInputs:
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in KEYS.items()}
    finetuned = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in pre.items()}
                 for _ in range(n_tasks)]
    return MergeInputs("test", [f"t{i}" for i in range(n_tasks)], pre, finetuned)


def run(name: str, given: MergeInputs, **params):
    method = registry.get(name)
    return method.run(given, method.params(**params))


def orthonormal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


# --- the maths by hand -------------------------------------------------------------------------

def test_iso_c_of_one_matrix_keeps_its_singular_vectors_and_flattens_its_spectrum():
    m = torch.randn(7, 5, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    flat = isotropic(m)
    assert torch.allclose(torch.linalg.svdvals(flat), s.mean().expand(5))
    assert torch.allclose(flat, s.mean() * u @ vh)


def test_tsv_m_on_tasks_in_mutually_orthogonal_subspaces_is_task_arithmetic():
    """Each task's top 1/T singular directions hold all of it and no other task's, so nothing
    is decorrelated away: the merge is the plain sum."""
    left, right = orthonormal(8, 1), orthonormal(6, 2)
    tasks = [left[:, 2 * t:2 * t + 2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64) * (t + 1))
             @ right[:, 2 * t:2 * t + 2].T for t in range(3)]   # rank 2 each; 1/T of r = 6 keeps 2
    assert torch.allclose(tsv_matrix(torch.stack(tasks)), sum(tasks))


def test_tsv_m_keeps_each_tasks_top_one_over_t_directions_only():
    stack = torch.randn(4, 12, 9, dtype=torch.float64)                   # r = 9, T = 4: int(9 / 4) = 2
    assert torch.linalg.matrix_rank(tsv_matrix(stack)) == 4 * 2


def test_iso_cts_with_every_direction_common_is_iso_c():
    stack = torch.randn(3, 10, 6, dtype=torch.float64)
    assert torch.allclose(iso_cts_matrix(stack, 1.0), isotropic(stack.sum(0)))


@pytest.mark.parametrize("rank, tasks, common, per_task", [(768, 8, 616, 19), (1024, 8, 816, 26), (50, 8, 42, 1),
                                                           (64, 8, 48, 2)])
def test_iso_cts_subspace_sizes_are_the_references(rank, tasks, common, per_task):
    assert subspace_sizes(rank, tasks, 0.8) == (common, per_task)
    assert common + tasks * per_task == rank


def test_iso_cts_spectrum_is_flat_and_spans_the_common_and_every_tasks_own_directions():
    stack = torch.randn(4, 16, 12, dtype=torch.float64)
    merged = iso_cts_matrix(stack, 0.5)
    s = torch.linalg.svdvals(merged)
    assert torch.allclose(s, s[0].expand(12))                              # r = 12 directions, all equal


def test_wudi_reaches_the_closed_form_optimum_of_its_quadratic():
    """sum_i w_i ||(M - tau_i) tau_i^T||^2 is minimal where M sum_i w_i G_i = sum_i w_i tau_i G_i,
    G_i = tau_i^T tau_i, w_i = 1 / ||tau_i||^2."""
    stack = torch.randn(3, 4, 6, dtype=torch.float64)
    w = 1 / stack.flatten(1).norm(dim=1).square()
    grams = stack.transpose(1, 2) @ stack
    optimum = torch.linalg.solve((w[:, None, None] * grams).sum(0), (w[:, None, None] * stack @ grams).sum(0).T).T
    merged, (start, end) = wudi_matrix(stack, iterations=4000, lr=1e-2)
    assert torch.allclose(merged, optimum, atol=1e-4) and end < start


def test_wudi_starts_from_task_arithmetic_and_touches_only_the_linear_layers():
    given = inputs()
    untrained = run("wudi_merging", given, iterations=0).state
    for key, value in untrained.items():
        expected = given.pretrained[key] + (sum(tv[key] for tv in given.vectors) if key.endswith(LINEAR) else 0)
        assert torch.allclose(value, expected), key
    everything = run("wudi_merging", given, iterations=0, matrices="all").state
    mean = given.pretrained["ln_pre.weight"] + sum(tv["ln_pre.weight"] for tv in given.vectors) / 3
    assert torch.allclose(everything["ln_pre.weight"], mean)
    assert torch.allclose(everything["proj"], given.pretrained["proj"] + sum(tv["proj"] for tv in given.vectors))


def test_consensus_keeps_the_entries_at_least_k_tall_masks_hold():
    # columns are entries, rows tasks
    # entry 0: tasks 0 and 1 dominate (|1| > 0.6 |1.9 - 1|), task 2 does not -> kept at k = 2
    # entry 1: task 0 alone ("selfish") -> dropped at k = 2, kept at k = 1
    # entry 2: no task outweighs the others ("catastrophic"): dropped even at k = 1
    stack = torch.tensor([[1.0, 1.0, 0.1], [1.0, 0.0, 0.1], [-0.1, 0.0, 0.1]])
    masks = tall_masks(stack, 0.6)
    assert masks.tolist() == [[True, True, False], [True, False, False], [False, False, False]]
    pre = {"w": torch.zeros(3)}
    given = MergeInputs("test", ["a", "b", "c"], pre, [{"w": row} for row in stack])
    for k, kept in ((2, [1, 0, 0]), (1, [1, 1, 0]), (0, [1, 1, 1]), (4, [0, 0, 0])):
        result = run("consensus_task_arithmetic", given, k=k, scaling=1.0)
        assert torch.equal(result.state["w"], stack.sum(0) * torch.tensor(kept)), k
    assert result.info["consensus_kept"] == 0.0


def test_every_new_method_is_deterministic_and_keeps_the_pretrained_layout():
    given = inputs()
    for name in ("tsv_merging", "iso_c", "iso_cts", "wudi_merging", "consensus_task_arithmetic"):
        first = run(name, given, **({"iterations": 20} if name == "wudi_merging" else {})).state
        again = run(name, given, **({"iterations": 20} if name == "wudi_merging" else {})).state
        assert all(torch.equal(first[k], again[k]) for k in first), name


# --- against literal transcriptions of the authors' code ---------------------------------------

def reference_tsv(vectors: list[dict], key: str) -> torch.Tensor:
    """TSV compute_and_sum_svd_mem_reduction, one key (buffers of one task's SVD size)."""
    sv_reduction = 1 / len(vectors)
    for i, tv in enumerate(vectors):
        vec = tv[key]
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        reduced_index_s = int(s.shape[0] * sv_reduction)
        sum_u[:, i * reduced_index_s:(i + 1) * reduced_index_s] = u[:, :reduced_index_s]
        sum_s[i * reduced_index_s:(i + 1) * reduced_index_s] = s[:reduced_index_s]
        sum_v[i * reduced_index_s:(i + 1) * reduced_index_s, :] = v[:reduced_index_s, :]
    u_u, s_u, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, s_v, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def reference_iso_c(vectors: list[dict], key: str) -> torch.Tensor:
    """iso.py iso_c, one key."""
    tvs = [tv[key] for tv in vectors]
    new = sum(tvs) / len(tvs)
    if len(tvs[0].shape) == 2:
        new *= len(tvs)
        U, S, V = torch.linalg.svd(new, full_matrices=False)
        new = torch.linalg.multi_dot((U, torch.diag(torch.ones_like(S) * S.mean()), V))
    return new


def reference_iso_cts(vectors: list[dict], key: str, fraction: float) -> torch.Tensor:
    """iso.py iso_cts, one 2-D key."""
    shape_, n = vectors[0][key].shape, len(vectors)
    combined_w = sum(tv[key] for tv in vectors)
    common = int(min(shape_) * fraction)
    common = min(shape_) - round((min(shape_) - common) / n) * n
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per = int((min(shape_) - common) / n)
    for i, tv in enumerate(vectors):
        w = tv[key]
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            bu, bs, bv = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        bu[:, i * per:(i + 1) * per], bs[i * per:(i + 1) * per], bv[i * per:(i + 1) * per, :] = (
            u_ts[:, :per], s_ts[:per], v_ts[:per, :])
    bu[:, n * per:n * per + common], bs[n * per:n * per + common], bv[n * per:n * per + common, :] = cu, cs, cv
    a, _, b = torch.linalg.svd(bu, full_matrices=False)
    bu = a @ b
    a, _, b = torch.linalg.svd(bv, full_matrices=False)
    bv = a @ b
    return torch.linalg.multi_dot((bu, torch.diag(torch.ones_like(bs) * bs.mean()), bv))


def reference_wudi(vectors: list[dict], key: str, iter_num: int) -> torch.Tensor:
    """wudi_main.py get_redundant_task_vector, one key."""
    stacked = torch.stack([tv[key] for tv in vectors])
    merging_vector = torch.nn.Parameter(torch.sum(stacked, dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=1e-5, weight_decay=0)
    l2_norms = torch.square(torch.norm(stacked.reshape(stacked.shape[0], -1), p=2, dim=-1))
    for _ in range(iter_num):
        disturbing_vectors = merging_vector.unsqueeze(0) - stacked
        inner_product = torch.matmul(disturbing_vectors, stacked.transpose(1, 2))
        loss = torch.sum(torch.square(inner_product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.data


def reference_consensus(pre: dict, finetuned: list[dict], lam: float, k: int, alpha: float) -> dict:
    """tall_masks: flattened state dicts (sorted keys), generate_task_masks, the consensus count."""
    keys = sorted(pre)
    flat_ptm = torch.cat([pre[key].reshape(-1) for key in keys])
    flat_ft = torch.stack([torch.cat([ft[key].reshape(-1) for key in keys]) for ft in finetuned])
    tv = (flat_ft - flat_ptm).sum(0)
    flat_multi = flat_ptm + tv
    masks = (flat_ptm - flat_ft).abs() > (flat_multi - flat_ft).abs() * lam
    merged = tv * (masks.sum(0) >= k)
    out, offset = {}, 0
    for key in keys:
        out[key] = pre[key] + alpha * merged[offset:offset + pre[key].numel()].reshape(pre[key].shape)
        offset += pre[key].numel()
    return out


def matrices(given: MergeInputs) -> list[str]:
    return [k for k, v in given.pretrained.items() if v.dim() == 2]


def mean_of(given: MergeInputs, key: str) -> torch.Tensor:
    return sum(tv[key] for tv in given.vectors) / len(given.vectors)


@pytest.mark.parametrize("n_tasks", [3, 8])
def test_tsv_m_and_iso_match_their_authors_code(n_tasks):
    given = inputs(n_tasks)
    tsv = run("tsv_merging", given, alpha=0.7).state
    iso_c = run("iso_c", given, alpha=1.3).state
    iso_cts = run("iso_cts", given, alpha=1.5, common_space_fraction=0.8).state
    for key, pre in given.pretrained.items():
        is_matrix = key in matrices(given)
        assert torch.allclose(tsv[key], pre + 0.7 * (reference_tsv(given.vectors, key) if is_matrix
                                                      else mean_of(given, key)), atol=1e-10), key
        assert torch.allclose(iso_c[key], pre + 1.3 * reference_iso_c(given.vectors, key), atol=1e-10), key
        assert torch.allclose(iso_cts[key], pre + 1.5 * (reference_iso_cts(given.vectors, key, 0.8) if is_matrix
                                                         else mean_of(given, key)), atol=1e-10), key


def test_wudi_matches_its_authors_code():
    given = inputs(4)
    ours = run("wudi_merging", given, iterations=50).state
    for key, pre in given.pretrained.items():
        expected = pre + reference_wudi(given.vectors, key, 50) if key.endswith(LINEAR) else pre
        assert torch.allclose(ours[key], expected, atol=1e-12), key


def test_consensus_task_arithmetic_matches_its_authors_code():
    given = inputs(5)
    ours = run("consensus_task_arithmetic", given, scaling=0.4, tall_mask_lambda=0.5, k=2).state
    expected = reference_consensus(given.pretrained, given.finetuned, 0.5, 2, 0.4)
    assert all(torch.allclose(ours[k], expected[k], atol=1e-12) for k in ours)

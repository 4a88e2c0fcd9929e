"""Plain-PyTorch versions of the ``sgl_kernel`` CPU ops SGLang 0.5.23 calls.

Each function mirrors one op of sgl-kernel's CPU build; ``register()`` exposes
them as ``torch.ops.sgl_kernel.<name>`` with the schemas SGLang's call sites use
(``sglang/srt/layers/attention/intel_amx_backend.py``,
``sglang/kernels/ops/speculative/*.py``, ``sglang/srt/mem_cache/allocation.py``,
``sglang/kernels/ops/kvcache/cache_move.py``, ``sglang/srt/distributed/parallel_state.py``,
``sglang/srt/distributed/bootstrap.py`` and the wrappers in
``sgl_kernel/speculative.py`` and ``sgl_kernel/kvcacheio.py``).

Written for clarity, not speed: per-request Python loops over small batches.

Each op refuses what the kernel SGLang runs in its place on a GPU refuses, so
that a call a GPU would reject fails in the CPU tests too (issue 21: a k = 0
verify passed here and would raise on CUDA). The GPU kernels and their host
checks (SGLang 0.5.23 wheel):

* ``build_tree_kernel_efficient_cpu``: the JIT kernel of
  ``sglang/kernels/jit/csrc/speculative/tree.cuh`` refuses ``topk`` or
  ``depth`` < 1, ``draft_token_num`` outside 1..1024, an unknown mask mode,
  wrong ranks, sizes, dtypes (int64) or non-contiguous tensors, a parent list
  whose width is not ``topk * (depth - 1) + 1`` (depth > 1), a mask of fewer
  bytes than its mode needs, and bit-packing past 32 tokens;
* ``verify_tree_greedy_cpu``: the same file's kernel refuses wrong ranks,
  sizes, dtypes (int64 tree, int32 outputs), non-contiguous tensors, and no
  draft token or no accept slot;
* ``assign_*``, ``fill_*``, ``copy_all_layer_kv_cache_cpu``: their GPU twins
  are Triton kernels (``mem_cache/allocation.py``,
  ``kernels/ops/speculative/{cache_locs,eagle}.py``,
  ``kernels/ops/kvcache/cache_move.py``) that check nothing on the host;
* ``build_draft_decode_metadata_cpu``, the attention ops and the collectives
  are CPU-only (intel_amx, the shared-memory ring): no GPU twin.
"""

import ctypes

import torch
import torch.distributed as dist

NAMESPACE = "sgl_kernel"


# ---------------------------------------------------------------------------
# KV cache and request-to-token bookkeeping
# ---------------------------------------------------------------------------


def _rows_at_address(address: int, row_bytes: int, num_rows: int) -> torch.Tensor:
    """A writable uint8 [num_rows, row_bytes] view of memory SGLang gave us by address."""
    raw = (ctypes.c_uint8 * (row_bytes * num_rows)).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(num_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """For every KV buffer (base address + row stride in bytes) copy rows src_loc to tgt_loc."""
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.long()
    src = src_loc.long()
    # Only rows up to the largest index are touched, so the view need not cover the buffer.
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        rows = _rows_at_address(address, row_bytes, num_rows)
        # Indexing the right-hand side gathers first, so overlapping sets are safe.
        rows[tgt] = rows[src]


def _request_ranges(req_pool_indices, start_offset, end_offset):
    """(pool row, start, end, offset into the packed slot list) per request."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    packed = 0
    for row, start, end in zip(req_pool_indices.tolist(), starts, ends):
        yield row, start, end, packed
        packed += end - start


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """req_to_token[r, start:end] = the next (end - start) packed slots of out_cache_loc."""
    table = req_to_token.view(-1, pool_len)
    for row, start, end, packed in _request_ranges(req_pool_indices, start_offset, end_offset):
        table[row, start:end] = out_cache_loc[packed : packed + end - start]


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """The inverse gather: out_cache_loc packs req_to_token[r, start:end] over requests."""
    table = req_to_token.view(-1, pool_len)
    for row, start, end, packed in _request_ranges(req_pool_indices, start_offset, end_offset):
        out_cache_loc[packed : packed + end - start] = table[row, start:end]


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk, num_steps
):
    """out_cache_loc[i*n:(i+1)*n] = req_to_token[r_i, seq_len_i : seq_len_i + n], n = topk*num_steps."""
    table = req_to_token.view(-1, pool_len)
    n = topk * num_steps
    for i, (row, seq_len) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * n : (i + 1) * n] = table[row, seq_len : seq_len + n]


def build_draft_decode_metadata_cpu(req_to_token, req_pool_indices, seq_lens, topk, num_steps, pool_len):
    """One req_to_token row per (request, draft branch): committed slots, then that branch's draft slots.

    Branch k's draft slots sit at seq_len + k*num_steps in the request's row, the
    layout assign_draft_cache_locs_contiguous_cpu hands out.
    """
    table = req_to_token.view(-1, pool_len)
    rows = req_pool_indices.tolist()
    out = torch.zeros((len(rows) * topk, pool_len), dtype=req_to_token.dtype)
    for i, (row, seq_len) in enumerate(zip(rows, seq_lens.tolist())):
        for branch in range(topk):
            draft_start = seq_len + branch * num_steps
            out[i * topk + branch, :seq_len] = table[row, :seq_len]
            out[i * topk + branch, seq_len : seq_len + num_steps] = table[row, draft_start : draft_start + num_steps]
    return out


# ---------------------------------------------------------------------------
# Speculative verification
# ---------------------------------------------------------------------------


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride):
    """bonus_tokens[i] = the last accepted token of request i (accept_lens counts the bonus)."""
    rows = torch.arange(accept_lens.numel())
    flat_index = rows * accept_stride + accept_lens.long() - 1
    bonus_tokens.copy_(accept_tokens.reshape(-1)[flat_index])


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """Pack the cache slots of the accepted draft tokens (accept_index > -1, in order) to the front."""
    flat = accept_index.reshape(-1)
    accepted = flat[flat > -1].long()
    accept_out_cache_loc[: accepted.numel()] = out_cache_loc[accepted]


def _check(ok: bool, kernel: str, what: str) -> None:
    """The GPU kernel's host check (``RuntimeCheck`` / ``CHECK_HOST``), which
    raises RuntimeError there too."""
    if not ok:
        raise RuntimeError(f"{kernel}: {what} (refused by the GPU kernel too)")


def _match(kernel: str, name: str, t, shape, dtype, *, row_strided: bool = False) -> None:
    """sgl-kernel's ``TensorMatcher``: rank and sizes (None: any), dtype and
    layout. ``row_strided``: only the last dimension must be dense (the
    kernel's explicit strides, for a matrix that may have no columns);
    otherwise the tensor must be contiguous, the matcher's default."""
    _check(t.dim() == len(shape), kernel, f"{name} must have {len(shape)} dimensions, got {tuple(t.shape)}")
    for i, (got, want) in enumerate(zip(t.shape, shape)):
        _check(want is None or got == want, kernel, f"{name} has size {got} in dimension {i}, expected {want}")
    _check(t.dtype == dtype, kernel, f"{name} must be {dtype}, got {t.dtype}")
    if row_strided:
        rows, cols = t.shape
        dense = (cols == 1 or t.stride(1) == 1) and (cols == 0 or rows == 1 or t.stride(0) == cols)
    else:
        dense = t.is_contiguous()
    _check(dense, kernel, f"{name} is not contiguous")


def verify_tree_greedy_cpu(
    predicts,
    accept_index,
    accept_token_num,
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_predict,
):
    """Greedy walk of each request's draft tree, accepting children the target agrees with.

    From the root, look at the first child and then its siblings; a node is
    accepted when its token equals the target's prediction at the last accepted
    node, and the walk continues below it. predicts[i] gets the target's
    prediction at every accepted node i (the last one supplies the bonus token).
    """
    kernel = "verify_tree_greedy"
    _check(candidates.dim() == 2, kernel, f"candidates must be [bs, draft_tokens], got {tuple(candidates.shape)}")
    bs, draft_tokens = candidates.shape
    for name, t in (
        ("candidates", candidates),
        ("retrive_index", retrive_index),
        ("retrive_next_token", retrive_next_token),
        ("retrive_next_sibling", retrive_next_sibling),
        ("target_predict", target_predict),
    ):
        _match(kernel, name, t, (bs, draft_tokens), torch.int64)
    _match(kernel, "accept_index", accept_index, (bs, None), torch.int32)
    _match(kernel, "accept_token_num", accept_token_num, (bs,), torch.int32)
    _match(kernel, "predicts", predicts, (bs * draft_tokens,), torch.int32)
    _check(draft_tokens > 0 and accept_index.shape[1] > 0, kernel, "no draft token or no accept slot")
    num_steps = accept_index.shape[1]
    targets = target_predict.reshape(-1).tolist()
    tokens = candidates.tolist()
    flat_index = retrive_index.tolist()
    first_child = retrive_next_token.tolist()
    next_sibling = retrive_next_sibling.tolist()

    predict_at, predict_value, accept_counts = [], [], []
    for b in range(candidates.shape[0]):
        last = flat_index[b][0]
        accepted_path = [last]
        node = 0
        for _ in range(1, num_steps):
            child = first_child[b][node]
            while child != -1 and tokens[b][child] != targets[last]:
                child = next_sibling[b][child]
            if child == -1:
                break
            predict_at.append(last)
            predict_value.append(targets[last])
            last = flat_index[b][child]
            accepted_path.append(last)
            node = child
        predict_at.append(last)
        predict_value.append(targets[last])
        accept_index[b, : len(accepted_path)] = torch.tensor(accepted_path)
        accept_counts.append(len(accepted_path) - 1)

    predicts[torch.tensor(predict_at, dtype=torch.long)] = torch.tensor(predict_value, dtype=predicts.dtype)
    accept_token_num.copy_(torch.tensor(accept_counts, dtype=torch.long))


FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2  # sglang.srt.speculative.eagle_utils.TreeMaskMode


def _parent_nodes(parents, selected, topk, draft_token_num):
    """Parent node (0 = root) of each tree node 1..draft_token_num-1; None when it is missing.

    Node i is draft candidate selected[i-1]; candidate c was expanded from the
    node whose candidate is parents[c // topk] (c // topk == 0 means the root).
    """
    parent = [None] * draft_token_num
    for node in range(1, draft_token_num):
        expanded_from = selected[node - 1] // topk
        if expanded_from == 0:
            parent[node] = 0
        elif parents[expanded_from] in selected:
            parent[node] = selected.index(parents[expanded_from]) + 1
    return parent


def _ancestors(parent, node):
    """node and its ancestors up to, not including, the root."""
    chain = []
    while node not in (0, None):
        chain.append(node)
        node = parent[node]
    return chain


def build_tree_kernel_efficient_cpu(
    parent_list,
    selected_index,
    verified_seq_len,
    tree_mask,
    positions,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    topk,
    depth,
    draft_token_num,
    tree_mask_mode,
):
    """Turn the draft's (parent_list, selected_index) into tree links, positions and a mask.

    Per request: retrive_next_token/retrive_next_sibling give first child and
    next sibling of each node (children linked newest-first, as the CUDA
    kernel does), positions are seq_len + node depth, and the draft_token_num x
    draft_token_num mask lets each node see itself and its ancestors. FULL_MASK
    rows also carry seq_len prefix columns, which the caller has already set.
    depth is implied by the tree and checked only as the GPU kernel checks it.
    """
    kernel = "build_tree_kernel_efficient"
    # The GPU kernel's host checks, in its order (tree.cuh).
    _check(topk > 0 and depth > 0, kernel, f"topk ({topk}) and depth ({depth}) must be > 0")
    _check(0 < draft_token_num <= 1024, kernel, f"draft_token_num ({draft_token_num}) must be in 1..1024")
    _check(0 <= tree_mask_mode <= QLEN_ONLY_BITPACKING, kernel, f"unknown tree_mask_mode {tree_mask_mode}")
    _check(parent_list.dim() == 2, kernel, f"parent_list must be [bs, parent_width], got {tuple(parent_list.shape)}")
    bs = parent_list.shape[0]
    _match(kernel, "parent_list", parent_list, (bs, None), torch.int64, row_strided=True)
    _check(
        depth == 1 or parent_list.shape[1] == topk * (depth - 1) + 1,
        kernel,
        f"parent_list width {parent_list.shape[1]} must be topk * (depth - 1) + 1 = {topk * (depth - 1) + 1}",
    )
    n = draft_token_num
    _match(kernel, "selected_index", selected_index, (bs, n - 1), torch.int64, row_strided=True)
    _match(kernel, "verified_seq_len", verified_seq_len, (bs,), torch.int64)
    for name, t in (
        ("retrive_index", retrive_index),
        ("retrive_next_token", retrive_next_token),
        ("retrive_next_sibling", retrive_next_sibling),
    ):
        _match(kernel, name, t, (bs, n), torch.int64)
    _match(kernel, "positions", positions, (bs * n,), torch.int64)
    min_mask_bytes = 0
    if tree_mask_mode == QLEN_ONLY_BITPACKING:
        _check(n <= 32, kernel, f"bit-packed masks hold at most 32 tokens, not {n}")
        min_mask_bytes = bs * n * (4 if n > 16 else 2 if n > 8 else 1)
    elif tree_mask_mode == QLEN_ONLY:
        min_mask_bytes = bs * n * n
    _check(tree_mask.dim() == 1 and tree_mask.is_contiguous(), kernel, "tree_mask must be flat and contiguous")
    _check(
        tree_mask.numel() * tree_mask.element_size() >= min_mask_bytes,
        kernel,
        f"tree_mask has {tree_mask.numel() * tree_mask.element_size()} bytes, "
        f"mode {tree_mask_mode} needs {min_mask_bytes}",
    )
    if tree_mask_mode not in (FULL_MASK, QLEN_ONLY):
        raise NotImplementedError(f"tree_mask_mode {tree_mask_mode} (only FULL_MASK and QLEN_ONLY)")
    seq_lens = verified_seq_len.tolist()
    mask_offset = 0
    for b, seq_len in enumerate(seq_lens):
        parent = _parent_nodes(parent_list[b].tolist(), selected_index[b].tolist(), topk, n)

        first_child, next_sibling = [-1] * n, [-1] * n
        for node in range(n - 1, 0, -1):
            if parent[node] is not None:
                next_sibling[node] = first_child[parent[node]]
                first_child[parent[node]] = node
        retrive_index[b] = torch.arange(b * n, (b + 1) * n)
        retrive_next_token[b] = torch.tensor(first_child)
        retrive_next_sibling[b] = torch.tensor(next_sibling)

        block = torch.zeros((n, n), dtype=torch.bool)
        block[:, 0] = True
        depths = [0] * n
        for node in range(1, n):
            chain = _ancestors(parent, node)
            block[node, chain] = True
            depths[node] = len(chain)
        positions[b * n : (b + 1) * n] = torch.tensor(depths) + seq_len

        if tree_mask_mode == FULL_MASK:
            width = seq_len + n
            tree_mask[mask_offset : mask_offset + n * width].view(n, width)[:, seq_len:] = block
            mask_offset += n * width
        else:
            tree_mask[b * n * n : (b + 1) * n * n] = block.reshape(-1)


# ---------------------------------------------------------------------------
# Attention (intel_amx backend)
# ---------------------------------------------------------------------------


def _read_cache(buffer, slots, scale):
    """Rows of a KV buffer; an fp8 cache stores value / scale, so undo that."""
    rows = buffer[slots]
    if buffer.dtype.is_floating_point and buffer.dtype.itemsize == 1:
        return rows.float() * scale
    return rows


def _visible(query_pos, kv_len, prefix_len, is_causal, tree_block, window):
    """[num_queries, kv_len] bool: which keys each query may attend to.

    Prefix keys follow causality; keys of the new tokens follow tree_block when
    given (speculative verify). window > 0 keeps only the last `window` positions.
    """
    key_pos = torch.arange(kv_len)
    visible = torch.ones((len(query_pos), kv_len), dtype=torch.bool)
    if is_causal:
        visible = key_pos[None, :] <= query_pos[:, None]
    if tree_block is not None:
        visible[:, prefix_len:] = tree_block
    if window > 0:
        visible &= key_pos[None, :] > query_pos[:, None] - window
    return visible


def _attend(q, k, v, visible, sm_scale, logit_cap, sinks):
    """Softmax attention in float32. q [Lq, H, D]; k, v [Lk, Hkv, *]; returns [Lq, H, Dv].

    GQA repeats each KV head for its group of query heads; a sink is an extra
    per-head logit that takes softmax mass but contributes no value.
    """
    group = q.shape[1] // k.shape[1]
    q = q.float().transpose(0, 1)
    k = k.float().transpose(0, 1).repeat_interleave(group, dim=0)
    v = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.float().view(-1, 1, 1).expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v).transpose(0, 1)


def _reject_cross_attention(is_cross_attn, encoder_lens):
    if is_cross_attn or encoder_lens is not None:
        raise NotImplementedError("encoder-decoder attention is not supported by the pure-torch CPU ops")


def decode_attention_cpu(
    query,
    k_cache,
    v_cache,
    k_scale,
    v_scale,
    output,
    key,
    value,
    loc,
    attn_logits,
    req_to_token,
    req_pool_indices,
    seq_lens,
    sm_scale,
    logit_cap,
    is_cross_attn,
    sliding_window_size,
    encoder_lens,
    sinks,
):
    """Store the new key/value rows at loc, then one query per request over req_to_token[r, :seq_len].

    attn_logits is the CUDA-style split-KV scratch buffer; nothing here needs it.
    sliding_window_size counts visible positions including the query's own (0 = no window).
    """
    _reject_cross_attention(is_cross_attn, encoder_lens)
    if key is not None:
        k_cache[loc.long()] = key.to(k_cache.dtype)
        v_cache[loc.long()] = value.to(v_cache.dtype)
    for i, (row, seq_len) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        slots = req_to_token[row, :seq_len].long()
        visible = None
        if sliding_window_size > 0:
            visible = _visible(torch.tensor([seq_len - 1]), seq_len, 0, True, None, sliding_window_size)
        out = _attend(
            query[i : i + 1],
            _read_cache(k_cache, slots, k_scale),
            _read_cache(v_cache, slots, v_scale),
            visible,
            sm_scale,
            logit_cap,
            sinks,
        )
        output[i] = out[0].to(output.dtype)


def extend_attention_cpu(
    q_extend,
    k_extend,
    v_extend,
    o_extend,
    k_buffer,
    v_buffer,
    k_scale,
    v_scale,
    req_to_token,
    req_pool_indices,
    seq_lens,
    extend_seq_lens,
    extend_start_loc,
    max_len_extend,
    sm_scale,
    logit_cap,
    is_cross_attn,
    sliding_window_size,
    encoder_lens,
    sinks,
    tree_mask,
    is_causal,
):
    """Per request: its extend_len new queries over its cached prefix plus the new keys.

    The prefix comes from the cache (req_to_token[r, :prefix_len]); the new
    tokens' keys come from k_extend/v_extend, or from the cache when those are
    None (layers that share another layer's KV). tree_mask, when given, is the
    QLEN_ONLY verify mask: one extend_len x extend_len block per request.
    max_len_extend only sizes the CUDA kernel's tiles.
    """
    _reject_cross_attention(is_cross_attn, encoder_lens)
    mask_offset = 0
    for row, seq_len, extend_len, start in zip(
        req_pool_indices.tolist(),
        seq_lens.tolist(),
        extend_seq_lens.tolist(),
        extend_start_loc.tolist(),
    ):
        prefix_len = seq_len - extend_len
        new = slice(start, start + extend_len)
        if k_extend is None:
            slots = req_to_token[row, :seq_len].long()
            keys = _read_cache(k_buffer, slots, k_scale)
            values = _read_cache(v_buffer, slots, v_scale)
        else:
            slots = req_to_token[row, :prefix_len].long()
            keys = torch.cat([_read_cache(k_buffer, slots, k_scale).float(), k_extend[new].float()])
            values = torch.cat([_read_cache(v_buffer, slots, v_scale).float(), v_extend[new].float()])
        tree_block = None
        if tree_mask is not None:
            size = extend_len * extend_len
            tree_block = tree_mask[mask_offset : mask_offset + size].view(extend_len, extend_len).bool()
            mask_offset += size
        query_pos = torch.arange(prefix_len, seq_len)
        visible = _visible(query_pos, seq_len, prefix_len, is_causal, tree_block, sliding_window_size)
        out = _attend(q_extend[new], keys, values, visible, sm_scale, logit_cap, sinks)
        o_extend[new] = out.to(o_extend.dtype)


# ---------------------------------------------------------------------------
# Collectives (tensor parallelism)
# ---------------------------------------------------------------------------
#
# sgl-kernel's CPU build all-reduces through a shared-memory ring over the
# node's ranks, set up by initialize(size, rank). SGLang takes that path in
# GroupCoordinator.all_reduce/all_gather when is_shm_available(): on arm64
# hosts, or x86 ones with the AMX kernels this op set leaves out (elsewhere it
# calls torch.distributed itself). Here the ring is torch.distributed's default
# group: SGLang's CPU ranks all join it, and with TP alone it is the TP group.
# initialize() runs before that group exists, so it only records the ring it
# was promised and the collectives check they got that ring.

_shm_world = None  # (size, rank) from initialize()


def initialize(size, rank):
    """Remember the ring the collectives must run over (nothing to allocate)."""
    global _shm_world
    _shm_world = (size, rank)


def _ring_size() -> int:
    """Ranks in the ring; 1 (a local identity) when torch.distributed is not up."""
    if not dist.is_initialized():
        return 1
    size = dist.get_world_size()
    if _shm_world is not None and _shm_world != (size, dist.get_rank()):
        raise RuntimeError(
            f"sgl_kernel collectives: initialize{_shm_world} does not match the torch.distributed "
            f"default group (size {size}, rank {dist.get_rank()}), which these ops run over"
        )
    return size


def shm_allreduce(data, reduce_op):
    """In-place sum of data over the ring (the only reduction the shared-memory kernel has)."""
    if reduce_op != int(dist.ReduceOp.SUM):
        raise NotImplementedError(f"shm_allreduce: reduce_op {reduce_op} (only SUM)")
    if _ring_size() > 1:
        dist.all_reduce(data)


def shm_allgather(data, dim):
    """Every rank's data, concatenated along dim in rank order."""
    size = _ring_size()
    if size == 1:
        return data.clone()
    parts = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(parts, data.contiguous())
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

# Schemas follow SGLang's call sites; (a!)... marks the tensors an op writes.
_SCHEMAS = {
    copy_all_layer_kv_cache_cpu: ("(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()"),
    assign_req_to_token_pool_cpu: (
        "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, "
        "Tensor end_offset, Tensor out_cache_loc, int pool_len) -> ()"
    ),
    assign_extend_cache_locs_cpu: (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, "
        "Tensor end_offset, Tensor(a!) out_cache_loc, int pool_len) -> ()"
    ),
    assign_draft_cache_locs_contiguous_cpu: (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, "
        "Tensor(a!) out_cache_loc, int pool_len, int topk, int num_steps) -> ()"
    ),
    build_draft_decode_metadata_cpu: (
        "(Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, "
        "int topk, int num_steps, int pool_len) -> Tensor"
    ),
    fill_bonus_tokens_cpu: (
        "(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, int accept_stride) -> ()"
    ),
    fill_accept_out_cache_loc_cpu: (
        "(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()"
    ),
    verify_tree_greedy_cpu: (
        "(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, "
        "Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, "
        "Tensor retrive_next_sibling, Tensor target_predict) -> ()"
    ),
    build_tree_kernel_efficient_cpu: (
        "(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, "
        "Tensor(a!) tree_mask, Tensor(b!) positions, Tensor(c!) retrive_index, "
        "Tensor(d!) retrive_next_token, Tensor(e!) retrive_next_sibling, "
        "int topk, int depth, int draft_token_num, int tree_mask_mode) -> ()"
    ),
    decode_attention_cpu: (
        "(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, float k_scale, float v_scale, "
        "Tensor(c!) output, Tensor? key, Tensor? value, Tensor? loc, Tensor attn_logits, "
        "Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, float sm_scale, "
        "float logit_cap, bool is_cross_attn, int sliding_window_size, Tensor? encoder_lens, "
        "Tensor? sinks) -> ()"
    ),
    extend_attention_cpu: (
        "(Tensor q_extend, Tensor? k_extend, Tensor? v_extend, Tensor(a!) o_extend, "
        "Tensor k_buffer, Tensor v_buffer, float k_scale, float v_scale, Tensor req_to_token, "
        "Tensor req_pool_indices, Tensor seq_lens, Tensor extend_seq_lens, "
        "Tensor extend_start_loc, int max_len_extend, float sm_scale, float logit_cap, "
        "bool is_cross_attn, int sliding_window_size, Tensor? encoder_lens, Tensor? sinks, "
        "Tensor? tree_mask, bool is_causal) -> ()"
    ),
    initialize: "(int size, int rank) -> ()",
    shm_allreduce: "(Tensor(a!) data, int reduce_op) -> ()",
    shm_allgather: "(Tensor data, int dim) -> Tensor",
}

# An op without tensor arguments has no CPU dispatch key to pick its kernel by.
_DISPATCH_KEY = {initialize: "CompositeExplicitAutograd"}

OP_NAMES = tuple(fn.__name__ for fn in _SCHEMAS)

# torch.library drops an op's registrations when its Library object is collected.
_library = None


def _is_defined(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def register() -> None:
    """Expose every op as torch.ops.sgl_kernel.<name> (CPU). Safe to call again.

    An op that already exists (a second call, or a real sgl-kernel CPU build)
    is left as it is.
    """
    global _library
    missing = [fn for fn in _SCHEMAS if not _is_defined(fn.__name__)]
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library(NAMESPACE, "FRAGMENT")
    for fn in missing:
        _library.define(fn.__name__ + _SCHEMAS[fn])
        _library.impl(fn.__name__, fn, _DISPATCH_KEY.get(fn, "CPU"))

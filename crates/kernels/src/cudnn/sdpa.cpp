// cuDNN's fused attention (its FlashAttention-style SDPA engines, forward and backward) behind a
// small C interface for zoo-kernels' `attention_cudnn.rs`. Built by build.rs with the cuDNN
// frontend's headers (header-only C++; scripts/build-cuda.sh fetches them from PyPI) and
// NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: nothing links against cuDNN; `zoo_cudnn_load` opens the
// library at run time (the GPU machine has it in PyTorch's wheels), and without it the Rust side
// keeps zoo's own kernels.
//
// Graphs are built once per shape and mask (building takes tens of milliseconds, running
// microseconds) and cached per thread, with the thread's cuDNN handle per device.
#include <cudnn_frontend.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <map>
#include <memory>
#include <string>
#include <tuple>

namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace fe = cudnn_frontend;

extern "C" {
/// One attention call's shape and mask; `align` 0: no mask, 1: causal with query i seeing keys
/// j <= i (top-left), 2: causal with the last query seeing the last key (bottom-right); `window`
/// > 0: keys more than window - 1 positions back are hidden too.
struct ZooSdpa {
    int64_t b, h, hkv, tq, tk, d;
    int32_t dtype;  // 0 bf16, 1 f16
    int32_t align;
    int64_t window;
    float scale;
    int32_t device;
    int32_t deterministic;  // 1: the backward's deterministic algorithm (dQ without atomics)
};
}

namespace {

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV };

void write_err(char *err, size_t len, const std::string &msg) {
    if (err && len) {
        std::snprintf(err, len, "%s", msg.c_str());
    }
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int32_t, int32_t, int64_t, uint32_t, int32_t, bool, int32_t>;

Key key_of(const ZooSdpa &p, bool bwd) {
    uint32_t sbits;
    std::memcpy(&sbits, &p.scale, 4);
    return Key{p.b, p.h, p.hkv, p.tq, p.tk, p.d, p.dtype, p.align, p.window, sbits, p.device, bwd, bwd ? p.deterministic : 0};
}

struct Built {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

// Never freed (as the frontend leaks its own statics): destroying plans and handles while the
// process exits, after the CUDA context may be gone, is how teardown crashes start.
thread_local std::map<int32_t, cudnnHandle_t> &handles = *new std::map<int32_t, cudnnHandle_t>;
thread_local std::map<Key, Built> &graphs = *new std::map<Key, Built>;
// Shapes whose graph cuDNN refused, with its reason: asked again, the reason comes back at once.
thread_local std::map<Key, std::string> &refused = *new std::map<Key, std::string>;

cudnnHandle_t handle_for(int32_t device) {
    auto it = handles.find(device);
    if (it != handles.end()) {
        return it->second;
    }
    cudnnHandle_t h = nullptr;
    auto st = fe::detail::create_handle(&h);
    if (st != CUDNN_STATUS_SUCCESS) {
        throw std::runtime_error("cudnnCreate failed: status " + std::to_string(static_cast<int>(st)));
    }
    handles[device] = h;
    return h;
}

using Attrs = std::shared_ptr<fe::graph::Tensor_attributes>;

/// `t` as a contiguous (b, h, rows, d) tensor with this uid.
Attrs contiguous(Attrs t, int64_t uid, int64_t b, int64_t h, int64_t rows, int64_t d) {
    t->set_uid(uid).set_dim({b, h, rows, d}).set_stride({h * rows * d, rows * d, d, 1});
    return t;
}

Attrs tensor(fe::graph::Graph &g, const char *name, int64_t uid, int64_t b, int64_t h, int64_t t, int64_t d) {
    return contiguous(g.tensor(fe::graph::Tensor_attributes().set_name(name)), uid, b, h, t, d);
}

template <class Attrs>
void set_mask(Attrs &a, const ZooSdpa &p) {
    if (p.align == 1) {
        a.set_causal_mask(true);
    } else if (p.align == 2) {
        a.set_causal_mask_bottom_right(true);
    }
    if (p.window > 0) {
        a.set_sliding_window_length(static_cast<int>(p.window));
    }
}

void check(fe::error_object e, const char *what) {
    if (!e.is_good()) {
        throw std::runtime_error(std::string(what) + ": " + e.get_message());
    }
}

Built make(const ZooSdpa &p, bool bwd);

const Built &build(const ZooSdpa &p, bool bwd) {
    auto key = key_of(p, bwd);
    auto it = graphs.find(key);
    if (it != graphs.end()) {
        return it->second;
    }
    auto no = refused.find(key);
    if (no != refused.end()) {
        throw std::runtime_error(no->second);
    }
    try {
        return graphs.emplace(key, make(p, bwd)).first->second;
    } catch (const std::exception &e) {
        refused[key] = e.what();
        throw;
    }
}

Built make(const ZooSdpa &p, bool bwd) {
    auto handle = handle_for(p.device);
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(p.dtype == 0 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = tensor(*g, "Q", Q, p.b, p.h, p.tq, p.d);
    auto k = tensor(*g, "K", K, p.b, p.hkv, p.tk, p.d);
    auto v = tensor(*g, "V", V, p.b, p.hkv, p.tk, p.d);
    if (!bwd) {
        auto a = fe::graph::SDPA_attributes().set_name("zoo_sdpa").set_generate_stats(true).set_attn_scale(p.scale);
        set_mask(a, p);
        auto [o, stats] = g->sdpa(q, k, v, a);
        contiguous(o, O, p.b, p.h, p.tq, p.d)->set_output(true);
        contiguous(stats, STATS, p.b, p.h, p.tq, 1)->set_output(true).set_data_type(fe::DataType_t::FLOAT);
    } else {
        auto o = tensor(*g, "O", O, p.b, p.h, p.tq, p.d);
        auto dO = tensor(*g, "dO", DO, p.b, p.h, p.tq, p.d);
        auto stats = tensor(*g, "stats", STATS, p.b, p.h, p.tq, 1);
        stats->set_data_type(fe::DataType_t::FLOAT);
        auto a = fe::graph::SDPA_backward_attributes().set_name("zoo_sdpa_bwd").set_attn_scale(p.scale);
        a.set_deterministic_algorithm(p.deterministic != 0);
        set_mask(a, p);
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dO, stats, a);
        contiguous(dq, DQ, p.b, p.h, p.tq, p.d)->set_output(true);
        contiguous(dk, DK, p.b, p.hkv, p.tk, p.d)->set_output(true);
        contiguous(dv, DV, p.b, p.hkv, p.tk, p.d)->set_output(true);
    }
    check(g->validate(), "validate");
    check(g->build_operation_graph(handle), "build_operation_graph");
    check(g->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
    check(g->check_support(handle), "check_support");
    check(g->build_plans(handle), "build_plans");
    Built b;
    b.graph = g;
    check(g->get_workspace_size(b.workspace), "get_workspace_size");
    return b;
}

/// Runs `p`'s forward or backward graph on `stream` over the buffers of `pack` (uid -> address).
void execute(const ZooSdpa &p, bool bwd, void *stream, std::unordered_map<int64_t, void *> &pack, void *workspace) {
    const Built &b = build(p, bwd);
    auto handle = handle_for(p.device);
    if (fe::detail::set_stream(handle, static_cast<cudaStream_t>(stream)) != CUDNN_STATUS_SUCCESS) {
        throw std::runtime_error("cudnnSetStream failed");
    }
    check(b.graph->execute(handle, pack, workspace), "execute");
}

template <class F>
int guarded(char *err, size_t len, F f) {
    try {
        f();
        return 0;
    } catch (const std::exception &e) {
        write_err(err, len, e.what());
    } catch (...) {
        write_err(err, len, "unknown C++ exception");
    }
    return 1;
}

}  // namespace

extern "C" {

/// Opens cuDNN (`path`, or "libcudnn.so.9" on the loader's path) once; 0 on success, with the
/// library's version in *version.
int zoo_cudnn_load(const char *path, int64_t *version, char *err, size_t len) {
    return guarded(err, len, [&] {
        if (!fe::cudnn_dlhandle) {
            const char *lib = (path && *path) ? path : "libcudnn.so.9";
            void *h = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
            if (!h) {
                const char *e = dlerror();
                throw std::runtime_error(std::string("dlopen ") + lib + ": " + (e ? e : "unknown error"));
            }
            fe::cudnn_dlhandle = h;
        }
        *version = static_cast<int64_t>(fe::detail::get_backend_version());
    });
}

/// Builds (or finds) the forward (bwd = 0) or backward graph of `p`; *workspace: the bytes of
/// device memory its run needs.
int zoo_cudnn_sdpa_prepare(const ZooSdpa *p, int32_t bwd, int64_t *workspace, char *err, size_t len) {
    return guarded(err, len, [&] { *workspace = build(*p, bwd != 0).workspace; });
}

/// O (B, H, Tq, d) and the row log-sum-exps `stats` (B, H, Tq; natural log of the scaled scores)
/// of q (B, H, Tq, d), k and v (B, Hkv, Tk, d), all contiguous, on `stream`.
int zoo_cudnn_sdpa_fwd(const ZooSdpa *p, void *stream, const void *q, const void *k, const void *v, void *o, float *stats,
                       void *workspace, char *err, size_t len) {
    return guarded(err, len, [&] {
        std::unordered_map<int64_t, void *> pack = {{Q, const_cast<void *>(q)}, {K, const_cast<void *>(k)}, {V, const_cast<void *>(v)}, {O, o}, {STATS, stats}};
        execute(*p, false, stream, pack, workspace);
    });
}

/// dQ, dK, dV (in q's, k's, v's shapes and dtype) from the forward's inputs, its O and stats, and dO.
int zoo_cudnn_sdpa_bwd(const ZooSdpa *p, void *stream, const void *q, const void *k, const void *v, const void *o, const void *dO,
                       const float *stats, void *dq, void *dk, void *dv, void *workspace, char *err, size_t len) {
    return guarded(err, len, [&] {
        std::unordered_map<int64_t, void *> pack = {
            {Q, const_cast<void *>(q)}, {K, const_cast<void *>(k)}, {V, const_cast<void *>(v)}, {O, const_cast<void *>(o)},
            {DO, const_cast<void *>(dO)}, {STATS, const_cast<float *>(stats)}, {DQ, dq}, {DK, dk}, {DV, dv}};
        execute(*p, true, stream, pack, workspace);
    });
}
}

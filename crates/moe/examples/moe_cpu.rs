//! CPU time of one MoE feed-forward layer against the dense SwiGLU at equal active parameters,
//! forward + backward, at the MoE bench's shape (configs/moe-bench.toml: 2048 tokens, d 128;
//! dense hidden 352, E8 k2 experts of 176), and of its parts: the router alone, the expert bank on
//! rows already grouped, and the whole layer by each dispatch; grouped dispatch's CPU form
//! (`zoo_kernels::moe_experts`) beside its composition. The loss is Σ y ⊙ W. Medians of 9
//! after 1 warm-up.
//!
//!     cargo run --release -p zoo-moe --example moe_cpu
use zoo_core::check::median_ms;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use zoo_core::candle_core::{DType, Device, Result, Tensor, Var};
use zoo_core::mixer::{examples_from_toml, BuildCtx, FeedForward};
use zoo_core::mlp::{MlpConfig, SwiGlu};
use zoo_core::params::ParamStore;
use zoo_moe::{Dispatch, Moe, MoeConfig};

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (n, d) = (2048, 128);
    let ctx = BuildCtx { d_model: d, n_layers: 4, layer: 0, max_seq_len: 128, kind_layer: 0, kind_layers: 1 };
    let store = ParamStore::new(0, DType::F32, &dev);
    let dense = SwiGlu::new(&MlpConfig { hidden: Some(352), bias: false }, &ctx, &store.root().pp("dense"))?;
    let moe_of = |dispatch: &str| -> Result<Moe> {
        let cfg: MoeConfig = examples_from_toml(&[&format!(
            "n_experts = 8, top_k = 2, expert_hidden = 176, balance = {{ type = \"aux_loss\", alpha = 0.01 }}, dispatch = \"{dispatch}\""
        )])
        .remove(0);
        Moe::new(&cfg, &ctx, &store.root().pp(dispatch))
    };
    let (grouped, looped) = (moe_of("grouped")?, moe_of("looped")?);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev)?)?;
    let w = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
    let loss = |y: Tensor| -> Result<()> { (y * &w)?.sum_all()?.backward().map(|_| ()) };
    let ffn = |m: &dyn FeedForward| -> Result<()> {
        let out = m.forward(&x.as_tensor().unsqueeze(0)?)?;
        loss(out.y.squeeze(0)?)
    };
    let route = || -> Result<()> {
        let r = grouped.router.route(x.as_tensor())?;
        loss(r.weights.sum_keepdim(1)?.broadcast_mul(x.as_tensor())?)
    };
    let r = grouped.router.route(x.as_tensor())?;
    let packed = || -> Result<()> { loss(grouped.grouped(x.as_tensor(), &r, false)?) };
    let rows: Vec<(&str, f64)> = vec![
        ("dense SwiGLU (hidden 352)", median_ms(9, &|| ffn(&dense))?),
        ("MoE E8 k2 grouped, whole layer", median_ms(9, &|| ffn(&grouped))?),
        ("MoE E8 k2 looped, whole layer", median_ms(9, &|| ffn(&looped))?),
        ("  router alone (+ a loss through its weights)", median_ms(9, &route)?),
        ("  grouped dispatch on a fixed routing (CPU form)", median_ms(9, &packed)?),
        ("  the same as candle ops (its composition)", median_ms(9, &|| loss(grouped.grouped_composition(x.as_tensor(), &r, false)?))?),
        ("  looped dispatch on a fixed routing", median_ms(9, &|| loss(looped.dispatch(x.as_tensor(), &r, Dispatch::Looped)?))?),
    ];
    for (name, ms) in rows {
        println!("{name:48} {ms:8.2} ms");
    }
    Ok(())
}

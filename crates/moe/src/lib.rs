//! Mixture-of-experts feed-forwards for zoo: a [`router`] (token-choice top-k, softmax or sigmoid
//! scores, renormalisation, Switch aux loss, ST-MoE z-loss, DeepSeek-V3's aux-loss-free bias)
//! and SwiGLU experts (plus optional always-on shared experts, and an optional capacity factor that
//! drops assignments beyond ceil(factor · N·k / E) per expert, Switch-style), joined by a
//! dispatch that groups tokens by expert: one gather into rows sorted by expert, the experts
//! (on CUDA three batched matmuls over their stacked weights, [`ExpertBank`], with every
//! expert's rows padded to the busiest expert's count; on the CPU each expert on its slice), one
//! weighted combine back to the tokens ([`Dispatch::Grouped`], [`dispatch`]: both passes are
//! gathers, no `index_add`); the per-expert loop
//! ([`Dispatch::Looped`], `index_select` and `index_add` per expert, as candle-transformers' MoE)
//! stays as the reference the tests compare with.
//!
//! Statistics per layer ([`zoo_core::mixer::Stat`]): `load` (share of assignments per expert,
//! per expert), `load_cv` (coefficient of variation of the load), `max_load` (the busiest expert's
//! load over the mean: 1 when balanced, E when one expert takes everything), `router_entropy` (mean entropy
//! of the scores, nats), `dropped_fraction` (assignments the capacity dropped), `active_experts`
//! (experts per token in use: k for token choice without drops; it falls from E toward k under
//! the dense-to-sparse gate). Auxiliary losses go through `FfnOut::aux_loss`; the bias update runs in
//! `after_step`. The grouped and looped dispatches copy the expert indices to the host to group
//! tokens (one small copy, and so one wait for the GPU, per layer): the experts' slice lengths set
//! their matmuls' shapes. [`Dispatch::Tiled`] does without: the grouping is made on the device
//! into tiles of at most [`TILE`] rows under a static bound, and the experts run over the tiles.
//!
//! ```
//! use zoo_core::candle_core::{DType, Device, Tensor};
//! use zoo_core::mixer::{BuildCtx, FeedForward};
//! use zoo_core::params::ParamStore;
//! use zoo_moe::{Moe, MoeConfig};
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let ctx = BuildCtx { d_model: 8, n_layers: 1, layer: 0, max_seq_len: 4, kind_layer: 0, kind_layers: 1 };
//! let cfg: MoeConfig = zoo_core::mixer::examples_from_toml(&["n_experts = 4, top_k = 2"]).remove(0);
//! cfg.validate().unwrap();
//! let moe = Moe::new(&cfg, &ctx, &store.root())?;
//! let out = moe.forward(&Tensor::ones((2, 4, 8), DType::F32, &Device::Cpu)?)?;
//! assert_eq!(out.y.dims(), &[2, 4, 8]);
//! assert_eq!(out.stats[0].name, "load");
//! # Ok::<(), zoo_core::candle_core::Error>(())
//! ```

pub mod dispatch;
pub mod gate_stats;
pub mod moh;
pub mod router;

use router::{aux_loss, Activation, Balance, Noise, Router, Routing, Score, Selection};
use zoo_core::zoo_kernels;
use serde::{Deserialize, Serialize};
use zoo_core::candle_core::{DType, Result, Tensor};
use zoo_core::mixer::{BuildCtx, FeedForward, FfnOut, Stat, StatShape};
use zoo_core::mlp::{silu_mul, MlpConfig, SwiGlu};
use zoo_core::nn::{residual_std, Linear, INIT_STD};
use zoo_core::params::{Group, Init, Pb};

/// How tokens reach their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Dispatch {
    /// Sort the assignments by expert: one gather, the experts, one combine ([`dispatch::Plan`],
    /// [`Moe::grouped`]). On CUDA the experts run as one batched SwiGLU over rows padded to the
    /// busiest expert's count (computing max/mean load times the kept rows: 1.14× at the routing
    /// ablation's aux-loss balance, 2.27× without balancing); on the CPU each on its packed slice.
    #[default]
    Grouped,
    /// One gather and one scatter-add per expert (the reference).
    Looped,
    /// Grouped on the device, with no host round-trip: the router's top-k stays on the device,
    /// one kernel groups the slots by expert into tiles of at most [`TILE`] rows ([`tile_for`],
    /// `zoo_kernels::moe_plan`), and the experts run as three batched matmuls over the tiles,
    /// each tile with its expert's weights (gathered per tile). The shapes do not depend on the
    /// routing (a static bound of `ceil(N·k / tile) + E` tiles), so the step can be captured into
    /// a CUDA graph. With `capacity_factor` every expert holds exactly `ceil(cf · N·k / E)` rows
    /// instead (`zoo_kernels::moe_plan::plan_capacity`: the slots past it dropped, as grouped
    /// dispatch drops them), and the experts run as one batched matmul over (E, cap, d) with their
    /// weights read in place, no per-tile copies. Token choice without noise or selection bias
    /// only (the config says so otherwise).
    Tiled,
}

/// Rows per tile of [`Dispatch::Tiled`] at most: each expert's rows are padded to a multiple of
/// the tile, which is this, or less for few slots per expert ([`tile_for`]).
pub const TILE: usize = 64;

/// The tile of [`Dispatch::Tiled`] for `slots` assignments over `experts`: the mean slots per
/// expert rounded up to a power of two, between 8 and [`TILE`] (a decoding step's few slots
/// would otherwise fill mostly padding). It depends on the shapes only, not on the routing.
pub fn tile_for(slots: usize, experts: usize) -> usize {
    (slots / experts.max(1)).next_power_of_two().clamp(8, TILE)
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// `type = "moe"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub top_k: usize,
    /// Each expert's SwiGLU hidden width (default: the dense SwiGLU's, 8/3·d rounded to 8).
    #[serde(default)]
    pub expert_hidden: Option<usize>,
    #[serde(default)]
    pub score: Score,
    /// Softmax temperature τ (softmax scores only).
    #[serde(default = "one")]
    pub temperature: f64,
    /// Renormalise the k picked scores to sum to 1.
    #[serde(default = "yes")]
    pub renormalize: bool,
    #[serde(default)]
    pub balance: Balance,
    /// Router z-loss weight β (0 = off).
    #[serde(default)]
    pub z_loss: f64,
    #[serde(default)]
    pub dispatch: Dispatch,
    /// Capacity factor: each expert takes at most ceil(factor · N·k / E) assignments per batch,
    /// the rest are dropped (Switch). Absent: dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Always-on experts added to every token's output (DeepSeekMoE's shared experts).
    #[serde(default)]
    pub shared_experts: usize,
    /// Scale the shared experts' output by σ(x w_g), a learned per-token gate (Qwen-MoE style).
    #[serde(default)]
    pub shared_gate: bool,
    /// Activation on the router logits before the (tempered) softmax.
    #[serde(default)]
    pub activation: Activation,
    /// Router noise in training steps.
    #[serde(default)]
    pub noise: Noise,
    /// Token choice (default), expert choice, or the dense-to-sparse gate.
    #[serde(default)]
    pub routing: Selection,
}

impl MoeConfig {
    /// Check the config; the error starts with the field's name.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_experts == 0 {
            return Err("n_experts: must be at least 1".into());
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return Err(format!("top_k: {} must be in 1..={} (n_experts)", self.top_k, self.n_experts));
        }
        if self.expert_hidden == Some(0) {
            return Err("expert_hidden: must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!("temperature: {} must be positive and finite", self.temperature));
        }
        if let Some(c) = self.capacity_factor.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(format!("capacity_factor: {c} must be positive and finite"));
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            return Err(format!("z_loss: {} must be finite and >= 0", self.z_loss));
        }
        if self.shared_gate && self.shared_experts == 0 {
            return Err("shared_gate: needs shared_experts >= 1".into());
        }
        if let Noise::Jitter { eps } = self.noise {
            if !(eps.is_finite() && (0.0..1.0).contains(&eps)) {
                return Err(format!("noise.eps: {eps} must be in [0, 1)"));
            }
        }
        match self.routing {
            Selection::TokenChoice => {}
            Selection::ExpertChoice { capacity_factor } => {
                if !(capacity_factor.is_finite() && capacity_factor > 0.0) {
                    return Err(format!("routing.capacity_factor: {capacity_factor} must be positive and finite"));
                }
            }
            Selection::DenseToSparse { tau_start, tau_end, anneal_steps, threshold } => {
                for (name, t) in [("tau_start", tau_start), ("tau_end", tau_end)] {
                    if !(t.is_finite() && t > 0.0) {
                        return Err(format!("routing.{name}: {t} must be positive and finite"));
                    }
                }
                if anneal_steps == Some(0) {
                    return Err("routing.anneal_steps: must be at least 1".into());
                }
                if !(threshold.is_finite() && (0.0..1.0).contains(&threshold)) {
                    return Err(format!("routing.threshold: {threshold} must be in [0, 1)"));
                }
            }
        }
        if self.routing != Selection::TokenChoice {
            if self.capacity_factor.is_some() {
                return Err("capacity_factor: token dropping applies to token choice (expert choice has routing.capacity_factor)".into());
            }
            if matches!(self.balance, Balance::Bias { .. }) {
                return Err("balance: the selection bias applies to token choice only".into());
            }
        }
        if self.dispatch == Dispatch::Tiled {
            let why = if self.routing != Selection::TokenChoice {
                Some("routing: tiled dispatch takes token choice")
            } else if !matches!(self.noise, Noise::None) {
                Some("noise: tiled dispatch routes without noise")
            } else if matches!(self.balance, Balance::Bias { .. }) {
                Some("balance: the selection bias needs the loads on the host; tiled dispatch keeps them on the device")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("{why} (dispatch = \"tiled\")"));
            }
        }
        match self.balance {
            Balance::AuxLoss { alpha } if !(alpha.is_finite() && alpha >= 0.0) => {
                Err(format!("balance.alpha: {alpha} must be finite and >= 0"))
            }
            Balance::Bias { gamma } if !(gamma.is_finite() && gamma >= 0.0) => {
                Err(format!("balance.gamma: {gamma} must be finite and >= 0"))
            }
            _ => Ok(()),
        }
    }
}

/// The routed experts: E SwiGLU feed-forwards `w2ᵀ(silu(w1ᵀx) ⊙ w3ᵀx)` with their weights
/// stacked, `w1`, `w3` (E, d, h) and `w2` (E, h, d), so that all experts run as one batched matmul.
pub struct ExpertBank {
    pub w1: Tensor,
    pub w3: Tensor,
    pub w2: Tensor,
}

impl ExpertBank {
    /// `experts.w1`, `experts.w3`, `experts.w2` (initialised as the dense SwiGLU's matrices).
    pub fn new(pb: &Pb, n: usize, d: usize, h: usize, n_layers: usize) -> Result<Self> {
        let pb = pb.pp("experts");
        Ok(Self {
            w1: pb.get("w1", (n, d, h), Init::Normal(INIT_STD), Group::Decay)?,
            w3: pb.get("w3", (n, d, h), Init::Normal(INIT_STD), Group::Decay)?,
            w2: pb.get("w2", (n, h, d), Init::Normal(residual_std(n_layers)), Group::Decay)?,
        })
    }

    pub fn len(&self) -> usize {
        self.w1.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert e on its tokens x (C, d) (the per-expert loop's reference).
    pub fn one(&self, e: usize, x: &Tensor) -> Result<Tensor> {
        let w = |t: &Tensor| t.narrow(0, e, 1)?.squeeze(0)?.to_dtype(x.dtype());
        let z = silu_mul(&x.matmul(&w(&self.w1)?)?, &x.matmul(&w(&self.w3)?)?)?;
        z.matmul(&w(&self.w2)?)
    }

    /// Every expert on its own slice of the rows: xs (R, d) packed by expert (`lens[e]` rows each,
    /// in expert order) -> (R, d), three [`grouped_matmul`]s.
    pub fn packed(&self, xs: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let dt = xs.dtype();
        let w = |t: &Tensor| t.to_dtype(dt);
        let z = silu_mul(&grouped_matmul(xs, &w(&self.w1)?, lens)?, &grouped_matmul(xs, &w(&self.w3)?, lens)?)?;
        grouped_matmul(&z, &w(&self.w2)?, lens)
    }

    /// Every tile of rows with its expert: xs (T·tile, d), `tile_expert` (T,) u32 -> (T·tile, d),
    /// three batched matmuls over the tiles with each tile's expert weights gathered.
    pub fn tiles(&self, xs: &Tensor, tile_expert: &Tensor, tile: usize) -> Result<Tensor> {
        let (dt, t) = (xs.dtype(), tile_expert.dim(0)?);
        let x3 = xs.reshape((t, tile, ()))?;
        let w = |w: &Tensor| w.to_dtype(dt)?.index_select(tile_expert, 0);
        let z = silu_mul(&x3.matmul(&w(&self.w1)?)?, &x3.matmul(&w(&self.w3)?)?)?;
        z.matmul(&w(&self.w2)?)?.reshape((t * tile, ()))
    }

    /// Every expert on its rows at once: xs (E, C, d) -> (E, C, d), three batched matmuls.
    pub fn all(&self, xs: &Tensor) -> Result<Tensor> {
        let dt = xs.dtype();
        let z = silu_mul(&xs.matmul(&self.w1.to_dtype(dt)?)?, &xs.matmul(&self.w3.to_dtype(dt)?)?)?;
        z.matmul(&self.w2.to_dtype(dt)?)
    }
}

/// `y[rows of e] = x[rows of e] · w[e]`: x (R, k) packed by expert (`lens[e]` rows each, in
/// expert order), w (E, k, n) -> (R, n), one matmul per expert with rows; differentiable in x and
/// w. Its backward builds each gradient in one buffer (w's slices zero for experts without rows),
/// where the composition (`w.narrow(0, e, 1)` per expert) would give every expert's slice a
/// full-size (E, k, n) gradient and add them up: E times the weight-sized traffic, which dominated
/// a small-batch CPU step (`results/bench/moe-cpu`).
pub fn grouped_matmul(x: &Tensor, w: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let (e, k, n) = w.dims3()?;
    if lens.len() != e || x.dim(0)? != lens.iter().sum::<usize>() || x.dim(1)? != k {
        zoo_core::candle_core::bail!("grouped_matmul: x {:?}, w {:?}, {} row counts summing to {}", x.dims(), w.dims(), lens.len(), lens.iter().sum::<usize>());
    }
    // Each expert's (start, len) among the rows, experts without rows left out.
    let spans: Vec<(usize, usize, usize)> = lens
        .iter()
        .scan(0, |start, &len| {
            let s = *start;
            *start += len;
            Some((s, len))
        })
        .enumerate()
        .filter(|(_, (_, len))| *len > 0)
        .map(|(i, (s, len))| (i, s, len))
        .collect();
    if spans.is_empty() {
        return Tensor::zeros((0, n), x.dtype(), x.device());
    }
    let (xd, wd) = (x.detach(), w.detach());
    let parts = spans.iter().map(|&(i, s, len)| xd.narrow(0, s, len)?.matmul(&wd.get(i)?)).collect::<Result<Vec<_>>>()?;
    let value = Tensor::cat(&parts, 0)?;
    zoo_core::grad::with_grad2(&value, x, w, move |g| {
        // dx_e = g_e · w[e]ᵀ; dw[e] = x_eᵀ · g_e (zero for experts without rows).
        let parts = spans.iter().map(|&(i, s, len)| g.narrow(0, s, len)?.matmul(&wd.get(i)?.t()?)).collect::<Result<Vec<_>>>()?;
        let dx = Tensor::cat(&parts, 0)?;
        let zero = Tensor::zeros((k, n), wd.dtype(), wd.device())?;
        let mut dw = vec![zero; e];
        for &(i, s, len) in &spans {
            dw[i] = xd.narrow(0, s, len)?.t()?.matmul(&g.narrow(0, s, len)?)?;
        }
        Ok((dx, Tensor::stack(&dw, 0)?))
    })
}

pub struct Moe {
    pub cfg: MoeConfig,
    pub router: Router,
    pub experts: ExpertBank,
    pub shared: Vec<SwiGlu>,
    /// w_g (d → 1) of the shared-expert gate.
    pub shared_gate: Option<Linear>,
}

impl Moe {
    pub fn new(cfg: &MoeConfig, ctx: &BuildCtx, pb: &Pb) -> Result<Self> {
        let d = ctx.d_model;
        let router =
            Router::new(&pb.pp("router"), d, cfg.n_experts, cfg.top_k, cfg.score, cfg.temperature, cfg.renormalize)?
                .with_options(&pb.pp("router"), ctx.layer, cfg.activation, cfg.noise.clone(), cfg.routing.clone())?;
        let router = if matches!(cfg.balance, Balance::Bias { .. }) {
            router.with_bias_state(&pb.pp("router"))?
        } else {
            router
        };
        let mlp = MlpConfig { hidden: cfg.expert_hidden, bias: false };
        let h = cfg.expert_hidden.unwrap_or_else(|| (8 * d / 3).div_ceil(8) * 8);
        let experts = ExpertBank::new(pb, cfg.n_experts, d, h, ctx.n_layers)?;
        let shared = (0..cfg.shared_experts)
            .map(|i| SwiGlu::new(&mlp, ctx, &pb.pp(format!("shared.{i}"))))
            .collect::<Result<_>>()?;
        let shared_gate =
            if cfg.shared_gate { Some(Linear::new(&pb.pp("shared_gate"), d, 1, false, INIT_STD)?) } else { None };
        Ok(Self { cfg: cfg.clone(), router, experts, shared, shared_gate })
    }

    /// Combine the experts' outputs for tokens x (N, d) under a routing, by `how`.
    pub fn dispatch(&self, x: &Tensor, r: &Routing, how: Dispatch) -> Result<Tensor> {
        let dev = x.device();
        match how {
            Dispatch::Looped => {
                let (n, k) = r.experts.dims2()?;
                let experts = &r.assignments;
                let weights = r.weights.flatten_all()?; // (N·k,), slot a = t·k + j
                let mut out = x.zeros_like()?;
                for e in 0..self.experts.len() {
                    let slots: Vec<u32> =
                        (0..n * k).filter(|&a| r.kept[a] && experts[a] as usize == e).map(|a| a as u32).collect();
                    if slots.is_empty() {
                        continue;
                    }
                    let tokens: Vec<u32> = slots.iter().map(|&a| a / k as u32).collect();
                    let (slots, tokens) = (Tensor::new(slots, dev)?, Tensor::new(tokens, dev)?);
                    let y = self.experts.one(e, &x.index_select(&tokens, 0)?)?;
                    let w = weights.index_select(&slots, 0)?.unsqueeze(1)?.to_dtype(y.dtype())?;
                    out = out.index_add(&tokens, &y.broadcast_mul(&w)?, 0)?;
                }
                Ok(out)
            }
            Dispatch::Grouped => self.grouped(x, r, dev.is_cuda()),
            // The routing was made on the host; group it as the grouped path does on this device.
            Dispatch::Tiled => self.grouped(x, r, dev.is_cuda()),
        }
    }

    /// The layer's forward, with tiled dispatch through its tiles composition (the CUDA path)
    /// where `cpu_form` is false, even on the CPU (tests compare the two there).
    pub fn forward_with(&self, x: &Tensor, cpu_form: bool) -> Result<FfnOut> {
        let (b, t, d) = x.dims3()?;
        let flat = x.reshape((b * t, d))?;
        if self.cfg.dispatch == Dispatch::Tiled {
            let (y, aux_loss, stats) = self.forward_tiled(&flat, cpu_form)?;
            let y = self.add_shared(&flat, y)?.reshape((b, t, d))?;
            return Ok(FfnOut { y, aux_loss, stats });
        }
        let mut r = self.router.route(&flat)?;
        if let Some(cf) = self.cfg.capacity_factor {
            r.apply_capacity(cf)?;
        }
        let y = self.dispatch(&flat, &r, self.cfg.dispatch)?;
        let y = self.add_shared(&flat, y)?.reshape((b, t, d))?;
        let balance = match self.cfg.balance {
            Balance::AuxLoss { alpha } => Some(aux_loss(&r, alpha)?),
            // Only training steps move the bias (an evaluation's loads would, and a resume would lose them).
            Balance::Bias { .. } => {
                if zoo_core::state::train_step().is_some() {
                    self.router.observe(&r.load);
                }
                None
            }
            Balance::None => None,
        };
        let aux = self.aux_losses(balance, &r.logits)?;
        let (share, cv, max_load) = r.load_shares();
        // The statistics counted on the host stay there (no upload per layer and step).
        let host = &zoo_core::candle_core::Device::Cpu;
        let stats = layer_stats(
            Tensor::from_vec(share, self.experts.len(), host)?,
            Tensor::new(&[cv as f32], host)?,
            Tensor::new(&[max_load as f32], host)?,
            &r.scores,
            Tensor::new(&[r.dropped_fraction() as f32], host)?,
            Tensor::new(&[r.active_per_token() as f32], host)?,
        )?;
        Ok(FfnOut { y, aux_loss: aux, stats })
    }

    /// [`Dispatch::Tiled`]'s layer on tokens (N, d): the output, the auxiliary losses and the
    /// statistics, with nothing read to the host on CUDA (on the CPU, with `cpu_form`, the
    /// experts run as grouped dispatch's CPU form).
    fn forward_tiled(&self, flat: &Tensor, cpu_form: bool) -> Result<(Tensor, Option<Tensor>, Vec<Stat>)> {
        let (n, k, e) = (flat.dim(0)?, self.cfg.top_k, self.experts.len());
        let r = self.router.route_on_device(flat)?;
        let tile = tile_for(n * k, e);
        // Under a capacity factor every expert holds `cap` rows (`Routing::apply_capacity`'s rule).
        let cap = self.cfg.capacity_factor.map(|cf| router::capacity(cf, n * k, e));
        let experts = r.experts.flatten_all()?;
        let (y, counts) = if cpu_form && zoo_kernels::moe_experts::unsupported(flat, &self.experts.w1).is_none() {
            // On the CPU the experts' indices are on the host already: grouped dispatch's CPU form
            // does the same sums as the tiles without their padding and per-tile weight copies,
            // and the counts are read off the indices (no tile plan is made).
            let assignments = experts.to_vec1::<u32>()?;
            let (kept, counts) = router::keep_first(&assignments, e, cap.unwrap_or(usize::MAX));
            let b = &self.experts;
            let y = zoo_kernels::moe_experts::experts_swiglu(flat, &b.w1, &b.w3, &b.w2, &r.weights, &assignments, &kept)?;
            let counts: Vec<u32> = counts.into_iter().map(|c| c as u32).collect();
            (y, Tensor::new(counts, flat.device())?)
        } else if let Some(c) = cap {
            // A capacity: every shape is fixed, so the experts run as one batched matmul over
            // (E, cap, d), their weights read in place.
            let p = zoo_kernels::moe_plan::plan_capacity(&experts, e, k, c)?;
            let plan = dispatch::Plan::from_parts(p.rows.clone(), p.slots.clone(), p.inv.clone(), n, k, c)?;
            let xs = plan.gather(flat)?.reshape((e, c, ()))?;
            let ys = self.experts.all(&xs)?.reshape((e * c, ()))?;
            (plan.combine(&ys, &r.weights)?, p.counts)
        } else {
            let p = zoo_kernels::moe_plan::plan(&experts, e, k, tile)?;
            let plan = dispatch::Plan::from_parts(p.rows.clone(), p.slots.clone(), p.inv.clone(), n, k, tile)?;
            let ys = self.experts.tiles(&plan.gather(flat)?, &p.tile_expert, tile)?;
            (plan.combine(&ys, &r.weights)?, p.counts)
        };
        // Each expert's kept slots (all of them when dropless), its share of them, and from it
        // what the host path counts.
        let routed = counts.to_dtype(DType::F32)?;
        let kept = match cap {
            Some(c) => routed.minimum(c as f64)?,
            None => routed,
        };
        let kept_total = kept.sum_all()?;
        let share = kept.broadcast_div(&kept_total.maximum(1.0)?)?.detach();
        let balance = match self.cfg.balance {
            Balance::AuxLoss { alpha } => Some(router::aux_loss_of(&r.scores, &share, alpha)?),
            _ => None,
        };
        let aux = self.aux_losses(balance, &r.logits)?;
        let mean = 1.0 / e as f64;
        let cv = ((share.affine(1.0, -mean)?.sqr()?.mean_all()?.sqrt()?) / mean)?.reshape(1)?;
        let max_load = (share.max(0)? / mean)?.reshape(1)?;
        let dropped = (1.0 - (&kept_total / (n * k).max(1) as f64)?)?.reshape(1)?;
        let active = (kept_total / n.max(1) as f64)?.reshape(1)?;
        Ok((y, aux, layer_stats(share, cv, max_load, &r.scores, dropped, active)?))
    }

    /// The balance loss (when given) plus the router z-loss of `logits` (when configured).
    fn aux_losses(&self, balance: Option<Tensor>, logits: &Tensor) -> Result<Option<Tensor>> {
        let z = (self.cfg.z_loss > 0.0).then(|| router::z_loss_of(logits, self.cfg.z_loss)).transpose()?;
        Ok(match (balance, z) {
            (Some(a), Some(z)) => Some((a + z)?),
            (a, z) => a.or(z),
        })
    }

    /// Grouped dispatch: one gather, the experts, one combine; on the CPU in fused mode (f32) the
    /// CPU form `zoo_kernels::moe_experts` does all three as one op. `batched`: every expert's rows
    /// padded to the busiest expert's count and the experts as three batched matmuls (the CUDA
    /// path: few launches); else the rows packed and each expert's 2-D matmuls on its slice (the
    /// CPU path: in a one-off timing on 2 cores at the routing ablation's shape, candle's CPU
    /// backward of the batched matmul alone took longer than the per-expert loop's whole
    /// backward; `results/bench/moe-cpu` measures the path kept).
    pub fn grouped(&self, x: &Tensor, r: &Routing, batched: bool) -> Result<Tensor> {
        if !batched && zoo_kernels::moe_experts::unsupported(x, &self.experts.w1).is_none() {
            // On the CPU (f32, fused mode): the experts and both data movements as one op.
            let b = &self.experts;
            return zoo_kernels::moe_experts::experts_swiglu(x, &b.w1, &b.w3, &b.w2, &r.weights, &r.assignments, &r.kept);
        }
        self.grouped_composition(x, r, batched)
    }

    /// [`Moe::grouped`] as candle ops (the reference of `zoo_kernels::moe_experts`, and what
    /// runs on CUDA and in naive mode).
    pub fn grouped_composition(&self, x: &Tensor, r: &Routing, batched: bool) -> Result<Tensor> {
        self.grouped_moving(x, r, batched, None)
    }

    /// [`Moe::grouped_composition`] with the rows moved by `zoo_kernels::moe_dispatch`'s ops
    /// (`Some(true)`), by candle ops (`Some(false)`) or by the device's default (`None`: the
    /// kernels on CUDA in fused mode unless `ZOO_MOE_DISPATCH_KERNELS=0`): the tests compare them on
    /// any device.
    pub fn grouped_moving(&self, x: &Tensor, r: &Routing, batched: bool, ops: Option<bool>) -> Result<Tensor> {
        let (e, k) = (self.experts.len(), r.experts.dim(1)?);
        let (plan, lens) = dispatch::Plan::new(&r.assignments, &r.kept, k, e, !batched, x.device())?;
        let plan = match ops {
            Some(o) => plan.with_ops(o),
            None => plan,
        };
        if plan.rows() == 0 {
            return x.zeros_like();
        }
        let xs = plan.gather(x)?; // one gather
        let ys = if batched {
            let xs = xs.reshape((e, plan.capacity(), ()))?;
            self.experts.all(&xs)?.reshape((e * plan.capacity(), ()))?
        } else {
            self.experts.packed(&xs, &lens)?
        };
        plan.combine(&ys, &r.weights) // one combine (gathers, no scatter)
    }
}

/// A layer's statistics, from its load shares (E,), their coefficient of variation and busiest
/// share over the mean (each (1,)), its scores (N, E) (for the router entropy), the dropped
/// fraction and the active experts per token: the names and shapes results carry, in one place.
fn layer_stats(load: Tensor, cv: Tensor, max_load: Tensor, scores: &Tensor, dropped: Tensor, active: Tensor) -> Result<Vec<Stat>> {
    Ok(vec![
        Stat::new("load", StatShape::PerExpert, load),
        Stat::new("load_cv", StatShape::Scalar, cv),
        Stat::new("max_load", StatShape::Scalar, max_load),
        Stat::new("router_entropy", StatShape::Scalar, router::entropy(scores)?.to_dtype(DType::F32)?.detach()),
        Stat::new("dropped_fraction", StatShape::Scalar, dropped),
        Stat::new("active_experts", StatShape::Scalar, active),
    ])
}

impl Moe {
    /// `y` plus the shared experts' output on tokens (N, d) (gated when configured).
    fn add_shared(&self, flat: &Tensor, y: Tensor) -> Result<Tensor> {
        if self.shared.is_empty() {
            return Ok(y);
        }
        let mut ys = self.shared[0].forward(flat)?.y;
        for s in &self.shared[1..] {
            ys = (ys + s.forward(flat)?.y)?;
        }
        if let Some(g) = &self.shared_gate {
            ys = ys.broadcast_mul(&zoo_core::candle_nn::ops::sigmoid(&g.forward(flat)?)?)?;
        }
        y + ys
    }
}

impl FeedForward for Moe {
    fn forward(&self, x: &Tensor) -> Result<FfnOut> {
        self.forward_with(x, true)
    }

    fn kind(&self) -> String {
        format!("moe(E{}k{})", self.cfg.n_experts, self.cfg.top_k)
    }

    fn after_step(&self) -> Result<()> {
        if let Balance::Bias { gamma } = self.cfg.balance {
            self.router.update_bias(gamma);
        }
        Ok(())
    }
}

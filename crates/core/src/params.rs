//! Named, trainable parameters with deterministic initialisation.
//!
//! candle's `VarBuilder` initialises from an unseedable CPU RNG, which breaks run determinism, so zoo
//! keeps its own store: every parameter is a `Var` (the f32 *master* copy, or f64 in gradient checks)
//! registered under a dotted name, initialised from [`Rng`], and tagged with whether AdamW weight decay
//! applies (nanoGPT's rule: matrices decay; norms, biases and embeddings do not, unless configured).

use crate::rng::Rng;
use crate::nn::Quant;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How a parameter starts.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal(0, std).
    Normal(f64),
    /// Uniform(-a, a).
    Uniform(f64),
    Const(f64),
}

/// Which AdamW group a parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Matrices of linear maps: weight decay applies.
    Decay,
    /// Norm gains, biases: no decay.
    NoDecay,
    /// Embedding tables: decay only if the config asks for it.
    Embedding,
    /// Not trained: state a layer updates itself and that must survive a checkpoint (the MoE
    /// router's aux-loss-free selection bias). No optimiser slot, no gradient expected, not
    /// counted in [`ParamStore::num_params`]; saved and loaded with the parameters.
    Buffer,
}

#[derive(Clone)]
pub struct Param {
    pub var: Var,
    pub group: Group,
}

struct Inner {
    params: BTreeMap<String, Param>,
    rng: Rng,
    /// Loaded weights that parameters take instead of an initialisation ([`ParamStore::preset`]);
    /// each is removed when its parameter is created.
    preset: Option<BTreeMap<String, Tensor>>,
    /// With a preset: initialise parameters it lacks (recorded in `fresh`) instead of failing.
    preset_extends: bool,
    fresh: Vec<String>,
    /// Quantized copies of weights for inference matmuls ([`ParamStore::set_quantized`]).
    quantized: BTreeMap<String, Quant>,
}

/// A shared store of parameters; cheap to clone.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    dtype: DType,
    device: Device,
}

impl ParamStore {
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                params: BTreeMap::new(),
                rng: Rng::new(seed).fork(0x1417),
                preset: None,
                preset_extends: false,
                fresh: Vec::new(),
                quantized: BTreeMap::new(),
            })),
            dtype,
            device: device.clone(),
        }
    }

    /// A store whose parameters take their values from `tensors` (a loaded checkpoint) as the model
    /// is built, with no random initialisation: a parameter missing from `tensors`, or of another
    /// shape, fails the build; [`ParamStore::finish_preset`] then reports tensors nothing used.
    /// Same checks as [`ParamStore::load`], without first building (and filling) a random model.
    pub fn preset(tensors: BTreeMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        let store = Self::new(0, dtype, device);
        store.inner.lock().unwrap().preset = Some(tensors);
        store
    }

    /// As [`ParamStore::preset`], but a parameter that `tensors` lacks (one a variant adds, e.g.
    /// sink logits or a gate) is initialised from `seed` as in a fresh model and listed by
    /// [`ParamStore::fresh`]. Shape mismatches still fail.
    pub fn preset_extending(tensors: BTreeMap<String, Tensor>, seed: u64, dtype: DType, device: &Device) -> Self {
        let store = Self::new(seed, dtype, device);
        {
            let mut inner = store.inner.lock().unwrap();
            inner.preset = Some(tensors);
            inner.preset_extends = true;
        }
        store
    }

    /// Parameters a [`ParamStore::preset_extending`] store initialised because the preset lacked them.
    pub fn fresh(&self) -> Vec<String> {
        self.inner.lock().unwrap().fresh.clone()
    }

    /// Every quantized inference copy (see [`ParamStore::set_quantized`]).
    pub fn quantized_all(&self) -> BTreeMap<String, Quant> {
        self.inner.lock().unwrap().quantized.clone()
    }

    /// After building from [`ParamStore::preset`]: an error naming the first tensor that no
    /// parameter took (the checkpoint and the model disagree).
    pub fn finish_preset(&self) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(left) = inner.preset.take() {
            if let Some(name) = left.keys().next() {
                anyhow::bail!("checkpoint has tensor `{name}` that the model does not")
            }
        }
        Ok(())
    }

    /// Quantized copies of weights (by parameter name, e.g. `layers.0.mixer.q_proj.weight`) that
    /// [`crate::nn::Linear`]s built afterwards use for inference matmuls on the CPU. Such matmuls have
    /// no backward: only inference entry points (generate, eval) set them.
    pub fn set_quantized(&self, q: BTreeMap<String, Quant>) {
        self.inner.lock().unwrap().quantized = q;
    }

    fn quantized(&self, name: &str) -> Option<Quant> {
        self.inner.lock().unwrap().quantized.get(name).cloned()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A builder rooted at the empty prefix.
    pub fn root(&self) -> Pb {
        Pb { store: self.clone(), prefix: String::new() }
    }

    /// All parameters by name (sorted, so iteration order is deterministic).
    pub fn params(&self) -> BTreeMap<String, Param> {
        self.inner.lock().unwrap().params.clone()
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        self.params().into_iter().map(|(k, p)| (k, p.var)).collect()
    }

    /// Trained parameters (buffers excluded).
    pub fn num_params(&self) -> usize {
        self.inner.lock().unwrap().params.values().filter(|p| p.group != Group::Buffer).map(|p| p.var.elem_count()).sum()
    }

    pub fn num_params_in(&self, group: Group) -> usize {
        self.inner.lock().unwrap().params.values().filter(|p| p.group == group).map(|p| p.var.elem_count()).sum()
    }

    /// Tensors to save, by name.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    /// Overwrite every parameter from `tensors` (e.g. a loaded checkpoint). Every parameter must be
    /// present with the same shape; extra entries are an error too, so a mismatched model cannot load.
    pub fn load(&self, tensors: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
        let params = self.params();
        for name in tensors.keys() {
            anyhow::ensure!(params.contains_key(name), "checkpoint has tensor `{name}` that the model does not");
        }
        for (name, p) in params {
            let t = tensors.get(&name).ok_or_else(|| anyhow::anyhow!("checkpoint lacks tensor `{name}`"))?;
            anyhow::ensure!(
                t.dims() == p.var.dims(),
                "tensor `{name}`: checkpoint shape {:?}, model shape {:?}",
                t.dims(),
                p.var.dims()
            );
            p.var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    fn create(&self, name: String, shape: Shape, init: Init, group: Group) -> Result<Tensor> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(p) = inner.params.get(&name) {
            if p.var.shape() != &shape {
                candle_core::bail!("parameter `{name}` requested twice with shapes {:?} and {:?}", p.var.shape(), shape)
            }
            return Ok(p.var.as_tensor().clone());
        }
        let extends = inner.preset_extends;
        let found = match inner.preset.as_mut() {
            None => None,
            Some(preset) => match preset.remove(&name) {
                Some(t) => Some(t),
                None if extends => {
                    inner.fresh.push(name.clone());
                    None
                }
                None => candle_core::bail!("checkpoint lacks tensor `{name}`"),
            },
        };
        if let Some(t) = found {
            if t.shape() != &shape {
                candle_core::bail!("tensor `{name}`: checkpoint shape {:?}, model shape {:?}", t.dims(), shape.dims())
            }
            let var = Var::from_tensor(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
            let out = var.as_tensor().clone();
            inner.params.insert(name, Param { var, group });
            return Ok(out);
        }
        let n = shape.elem_count();
        let data: Vec<f64> = match init {
            Init::Normal(std) => (0..n).map(|_| inner.rng.normal() * std).collect(),
            Init::Uniform(a) => (0..n).map(|_| (inner.rng.uniform() * 2.0 - 1.0) * a).collect(),
            Init::Const(c) => vec![c; n],
        };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_device(&self.device)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        inner.params.insert(name, Param { var, group });
        Ok(out)
    }
}

/// A prefix-scoped view of a [`ParamStore`], like candle's `VarBuilder`.
#[derive(Clone)]
pub struct Pb {
    store: ParamStore,
    prefix: String,
}

impl Pb {
    pub fn pp(&self, name: impl std::fmt::Display) -> Pb {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Pb { store: self.store.clone(), prefix }
    }

    pub fn get(&self, name: &str, shape: impl Into<Shape>, init: Init, group: Group) -> Result<Tensor> {
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        self.store.create(full, shape.into(), init, group)
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The quantized inference copy of parameter `name` under this prefix, if the store has one.
    pub fn quantized(&self, name: &str) -> Option<Quant> {
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        self.store.quantized(&full)
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

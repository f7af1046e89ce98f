//! A mixer defined outside the registry, here in a test crate, is checked by the shared contract
//! through its `examples()` alone; a broken copy of it is caught.

use zoo_core::candle_core::{Result, Tensor};
use zoo_core::check::mixer_contract;
use zoo_core::mixer::{BuildCtx, LayerProbe, LayerState, Mixer, MixerSpec, Phase, RecurrentState};
use zoo_core::nn::{Linear, INIT_STD};
use zoo_core::params::Pb;

/// y_t = W x_{t−1} + U x_t: a one-token memory (its state is the previous token).
struct PrevToken {
    w: Linear,
    u: Linear,
    d: usize,
    /// Broken on purpose: decode forgets the stored token.
    forget: bool,
}

impl Mixer for PrevToken {
    fn forward(
        &self,
        x: &Tensor,
        _: Phase,
        state: Option<&mut LayerState>,
        _: Option<&mut LayerProbe>,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let zero = Tensor::zeros((b, 1, d), x.dtype(), x.device())?;
        let prev = match state {
            None => zero,
            Some(st) => {
                let r = st.recurrent()?;
                let p = match (&r.conv, self.forget) {
                    (Some(p), false) => p.clone(),
                    _ => zero,
                };
                r.conv = Some(x.narrow(1, t - 1, 1)?.contiguous()?);
                r.seen += t;
                p
            }
        };
        let shifted = if t > 1 { Tensor::cat(&[&prev, &x.narrow(1, 0, t - 1)?], 1)? } else { prev };
        self.w.forward(&shifted)? + self.u.forward(x)?
    }

    fn new_state(&self, _capacity: usize) -> LayerState {
        LayerState::Recurrent(RecurrentState::default())
    }

    fn cache_bytes(&self, batch: usize, _seq_len: usize, dtype: zoo_core::candle_core::DType) -> usize {
        batch * self.d * dtype.size_in_bytes()
    }

    fn kind(&self) -> String {
        "prev_token".into()
    }
}

fn build(ctx: &BuildCtx, pb: &Pb, forget: bool) -> Result<Box<dyn Mixer>> {
    let d = ctx.d_model;
    Ok(Box::new(PrevToken {
        w: Linear::new(&pb.pp("w"), d, d, false, INIT_STD)?,
        u: Linear::new(&pb.pp("u"), d, d, true, INIT_STD)?,
        d,
        forget,
    }))
}

#[derive(Debug)]
struct PrevTokenConfig;

impl MixerSpec for PrevTokenConfig {
    fn validate(&self, _ctx: &BuildCtx) -> std::result::Result<(), String> {
        Ok(())
    }
    fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Box<dyn Mixer>> {
        build(ctx, pb, false)
    }
    fn examples() -> Vec<Self> {
        vec![PrevTokenConfig]
    }
}

#[derive(Debug)]
struct ForgetfulConfig;

impl MixerSpec for ForgetfulConfig {
    fn validate(&self, _ctx: &BuildCtx) -> std::result::Result<(), String> {
        Ok(())
    }
    fn build(&self, ctx: &BuildCtx, pb: &Pb) -> Result<Box<dyn Mixer>> {
        build(ctx, pb, true)
    }
    fn examples() -> Vec<Self> {
        vec![ForgetfulConfig]
    }
}

#[test]
fn a_new_mixer_is_checked_through_its_examples() -> Result<()> {
    let ok = mixer_contract::<PrevTokenConfig>()?;
    assert!(ok.is_empty(), "{ok:#?}");
    let bad = mixer_contract::<ForgetfulConfig>()?;
    assert!(bad.iter().any(|p| p.contains("ForgetfulConfig") && p.contains("decode")), "{bad:#?}");
    Ok(())
}

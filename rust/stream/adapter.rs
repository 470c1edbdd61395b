//! PEFT VB-LoRA adapter files to per-module low-rank factors, `A (r, in)` and `B (out, r)` in
//! float32, ready for `W += B @ A` (or its transpose for `fan_in_fan_out`).
//!
//! The file (`adapter_model.safetensors`) holds `base_model.vblora_vector_bank (num_vectors, L)` and,
//! per adapted module `M`, either full logits `M.vblora_logits_A (r, in/L, num_vectors)` and
//! `M.vblora_logits_B (out/L, r, num_vectors)`, or top-K (PEFT's `save_only_topk_weights`):
//! `..._topk_indices (.., topk)` in any integer dtype and `..._topk_weights (.., topk - 1)`, the first
//! `topk - 1` softmax weights. Top-K rows are decoded the way PEFT loads and then merges them:
//! weights `[w, 1 - sum(w)]`, logits `ln(w)`, entries ordered by logit (largest first), softmax.
//! The results agree with PEFT's to within float32 rounding (`ln`/`exp` here are not torch's); the
//! stored file is read whole (adapters are megabytes) and every tensor is validated first.
//!
//! Reading dispatches on the kind of each tensor name, so another file format is one more reader
//! producing the same [`Factors`]: [`packed_factors`] reads the packed single file
//! (`crate::packed`), whose decoder has already checked every index and weight row.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::error::StreamError;
use crate::matrix::MatRef;
use crate::packed::PackedError;
use crate::stored_topk;

pub const BANK_KEY: &str = "base_model.vblora_vector_bank";

/// The fields of `adapter_config.json` the factors depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdapterConfig {
    pub topk: usize,
    pub num_vectors: usize,
    pub vector_length: usize,
}

/// `a (rank, fan_in)` and `b (fan_out, rank)`, row-major float32.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub fan_in: usize,
    pub fan_out: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    A,
    B,
}

#[derive(Default)]
struct Stored<'d> {
    full: Option<TensorView<'d>>,
    indices: Option<TensorView<'d>>,
    weights: Option<TensorView<'d>>,
}

const SUFFIXES: [(&str, Which, u8); 6] = [
    (".vblora_logits_A_topk_indices", Which::A, 1),
    (".vblora_logits_A_topk_weights", Which::A, 2),
    (".vblora_logits_A", Which::A, 0),
    (".vblora_logits_B_topk_indices", Which::B, 1),
    (".vblora_logits_B_topk_weights", Which::B, 2),
    (".vblora_logits_B", Which::B, 0),
];

/// `(rank, fan_in, fan_out)` of a module: the shapes of its `A (rank, fan_in)` and
/// `B (fan_out, rank)`, known from the file's header before any factor is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rank: usize,
    pub fan_in: usize,
    pub fan_out: usize,
}

/// What a read builds: every module is always validated (indices, weights, logits, bank), in
/// time and memory linear in the file; factors, whose size is the adapted weights' and not the
/// file's, only for the modules asked for. Callers check the shapes against the model first,
/// then build module by module, so a small hostile file cannot make a huge allocation.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    Shapes,
    Factors(&'a [String]),
}

/// A module's shape, and its factors when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub shape: Shape,
    pub factors: Option<Factors>,
}

/// Every module of the adapter file at `path`, keyed by the module path as stored (e.g.
/// `base_model.model.model.layers.0.self_attn.q_proj`), with factors as `want` says.
pub fn adapter_modules(
    path: &Path,
    config: &AdapterConfig,
    want: Want<'_>,
    num_threads: usize,
) -> Result<BTreeMap<String, Module>, StreamError> {
    let bytes = std::fs::read(path).map_err(|e| StreamError::io(path, "reading", e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| StreamError::invalid(path, format!("not a safetensors file: {e}")))?;
    Reader {
        path,
        config,
        num_threads,
    }
    .read(&st, want)
}

/// Factors of every module in the adapter file at `path` (see [`adapter_modules`]).
pub fn adapter_factors(
    path: &Path,
    config: &AdapterConfig,
    num_threads: usize,
) -> Result<BTreeMap<String, Factors>, StreamError> {
    let modules = adapter_modules(path, config, Want::Shapes, num_threads)?;
    let names: Vec<String> = modules.into_keys().collect();
    let built = adapter_modules(path, config, Want::Factors(&names), num_threads)?;
    Ok(built
        .into_iter()
        .filter_map(|(name, m)| m.factors.map(|f| (name, f)))
        .collect())
}

fn wanted(want: Want<'_>, module: &str) -> bool {
    match want {
        Want::Shapes => false,
        Want::Factors(names) => names.iter().any(|n| n == module),
    }
}

/// The adapter config the file carries (`adapter_config.json` text) and every module of a packed
/// adapter file (`crate::packed`), keyed like [`adapter_modules`] (`key_prefix` + module path),
/// with factors as `want` says. The decoder has checked every index and weight row.
pub fn packed_modules(
    path: &Path,
    want: Want<'_>,
    num_threads: usize,
) -> Result<(String, BTreeMap<String, Module>), StreamError> {
    let packed = crate::packed::decode_file(path).map_err(|e| match e {
        PackedError::Io { path, what, source } => StreamError::io(&path, what, source),
        e => StreamError::invalid(path, format!("not a readable packed adapter: {e}")),
    })?;
    let config = AdapterConfig {
        topk: packed.topk,
        num_vectors: packed.num_vectors,
        vector_length: packed.vector_length,
    };
    let reader = Reader {
        path,
        config: &config,
        num_threads,
    };
    let building = matches!(want, Want::Factors(names) if !names.is_empty());
    let bank = if building {
        packed.bank.to_f32_vec()
    } else {
        Vec::new()
    };
    let stored_weights = if building {
        packed.weights.to_f32_vec()
    } else {
        Vec::new()
    };
    let prefix = packed.metadata.get("key_prefix").map_or("", String::as_str);
    let k = config.topk;
    let l = config.vector_length;
    let mut first_row = 0;
    let mut out = BTreeMap::new();
    for m in &packed.modules {
        let module = format!("{prefix}{}", m.path);
        let (a_rows, b_rows) = (m.r * m.in_sub, m.out_sub * m.r);
        let shape = reader.shape(&module, (m.r, m.in_sub), (m.out_sub, m.r))?;
        let start = first_row;
        first_row += a_rows + b_rows;
        if !wanted(want, &module) {
            out.insert(
                module,
                Module {
                    shape,
                    factors: None,
                },
            );
            continue;
        }
        let bank = MatRef::new("bank", &bank, config.num_vectors, l)
            .map_err(|e| StreamError::invalid(path, format!("vector_bank: {e}")))?;
        let gather = |span: std::ops::Range<usize>,
                      which: Which|
         -> Result<Vec<f32>, StreamError> {
            let key = format!("{module}.vblora_logits_{which:?}");
            let mut indices = packed.indices[span.start * k..span.end * k].to_vec();
            let stored = &stored_weights[span.start * (k - 1)..span.end * (k - 1)];
            let weights = reader.decode_topk(
                &format!("{key}_topk_indices"),
                &format!("{key}_topk_weights"),
                &mut indices,
                stored,
            )?;
            let kernel = |e: crate::KernelError| StreamError::invalid(path, format!("{key}: {e}"));
            let rows = span.len();
            let i = MatRef::new("indices", &indices, rows, k).map_err(kernel)?;
            let w = MatRef::new("weights", &weights, rows, k).map_err(kernel)?;
            crate::lowrank::low_rank_from_topk(i, w, bank, num_threads).map_err(kernel)
        };
        let a = gather(start..start + a_rows, Which::A)?;
        let b = gather(start + a_rows..start + a_rows + b_rows, Which::B)?;
        let factors = reader.factors(&module, a, (m.r, m.in_sub), &b, (m.out_sub, m.r))?;
        out.insert(
            module,
            Module {
                shape,
                factors: Some(factors),
            },
        );
    }
    let config_json = packed.metadata.get("config").cloned().unwrap_or_default();
    Ok((config_json, out))
}

/// The config text and the factors of every module of a packed adapter file (see
/// [`packed_modules`]).
pub fn packed_factors(
    path: &Path,
    num_threads: usize,
) -> Result<(String, BTreeMap<String, Factors>), StreamError> {
    let (_, modules) = packed_modules(path, Want::Shapes, num_threads)?;
    let names: Vec<String> = modules.into_keys().collect();
    let (config, built) = packed_modules(path, Want::Factors(&names), num_threads)?;
    let factors = built
        .into_iter()
        .filter_map(|(name, m)| m.factors.map(|f| (name, f)))
        .collect();
    Ok((config, factors))
}

/// Little-endian element values out of possibly unaligned tensor bytes.
fn collect<T: bytemuck::Pod>(data: &[u8]) -> Vec<T> {
    data.chunks_exact(std::mem::size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

struct Reader<'a> {
    path: &'a Path,
    config: &'a AdapterConfig,
    num_threads: usize,
}

impl Reader<'_> {
    fn bad<T>(&self, what: String) -> Result<T, StreamError> {
        Err(StreamError::invalid(self.path, what))
    }

    fn read(
        &self,
        st: &SafeTensors<'_>,
        want: Want<'_>,
    ) -> Result<BTreeMap<String, Module>, StreamError> {
        let AdapterConfig {
            topk,
            num_vectors,
            vector_length,
        } = *self.config;
        if topk == 0 || topk > num_vectors || vector_length == 0 {
            return self.bad(format!(
                "config has topk = {topk}, num_vectors = {num_vectors}, vector_length = \
                 {vector_length}; needs 1 <= topk <= num_vectors and vector_length >= 1"
            ));
        }
        let mut bank = None;
        let mut modules: BTreeMap<String, [Stored<'_>; 2]> = BTreeMap::new();
        let mut names: Vec<(&str, TensorView<'_>)> = st.iter().collect();
        names.sort_unstable_by_key(|(n, _)| *n);
        for (name, view) in names {
            if name == BANK_KEY {
                bank = Some(view);
                continue;
            }
            let Some((module, which, part)) = SUFFIXES
                .iter()
                .find_map(|(s, w, p)| name.strip_suffix(s).map(|m| (m, *w, *p)))
            else {
                return self.bad(format!(
                    "tensor {name} is neither VB-LoRA logits nor the vector bank; adapters with \
                     trained biases or modules_to_save cannot be merged this way"
                ));
            };
            let slot = &mut modules.entry(module.to_owned()).or_default()[which as usize];
            match part {
                0 => slot.full = Some(view),
                1 => slot.indices = Some(view),
                _ => slot.weights = Some(view),
            }
        }
        let Some(bank) = bank else {
            return self.bad(format!("missing tensor {BANK_KEY}"));
        };
        let bank = self.bank(&bank)?;
        let bank = MatRef::new(
            "bank",
            &bank,
            self.config.num_vectors,
            self.config.vector_length,
        )
        .expect("shape checked");
        if modules.is_empty() {
            return self.bad("holds no VB-LoRA logits".to_owned());
        }
        let mut out = BTreeMap::new();
        for (module, [a, b]) in &modules {
            let build = wanted(want, module);
            let (a, a_rows) = self.rows(module, Which::A, a, bank, build)?;
            let (b, b_rows) = self.rows(module, Which::B, b, bank, build)?;
            let shape = self.shape(module, a_rows, b_rows)?;
            let factors = if build {
                Some(self.factors(module, a, a_rows, &b, b_rows)?)
            } else {
                None
            };
            out.insert(module.clone(), Module { shape, factors });
        }
        Ok(out)
    }

    /// The factors' shape from `logits_A (r, in/L, ..)` and `logits_B (out/L, r, ..)` leading dims.
    fn shape(
        &self,
        module: &str,
        (rank, in_tiles): (usize, usize),
        (out_tiles, b_rank): (usize, usize),
    ) -> Result<Shape, StreamError> {
        if rank != b_rank {
            return self.bad(format!(
                "module {module}: vblora_logits_A has rank {rank} but vblora_logits_B has rank {b_rank}"
            ));
        }
        let l = self.config.vector_length;
        let (Some(fan_in), Some(fan_out)) = (in_tiles.checked_mul(l), out_tiles.checked_mul(l))
        else {
            return self.bad(format!("module {module}: its weight shape overflows"));
        };
        Ok(Shape {
            rank,
            fan_in,
            fan_out,
        })
    }

    fn bank(&self, view: &TensorView<'_>) -> Result<Vec<f32>, StreamError> {
        let want = [self.config.num_vectors, self.config.vector_length];
        if view.shape() != want {
            return self.bad(format!(
                "tensor {BANK_KEY} has shape {:?}, the config says {want:?} (num_vectors, vector_length)",
                view.shape()
            ));
        }
        let bank = self.floats(BANK_KEY, view)?;
        if bank.iter().any(|x| !x.is_finite()) {
            return self.bad(format!("tensor {BANK_KEY} holds NaN or infinite values"));
        }
        Ok(bank)
    }

    /// A float tensor's values as `f32` (exact widening).
    fn floats(&self, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, StreamError> {
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => collect::<f32>(data),
            Dtype::F16 => collect::<f16>(data).into_iter().map(f16::to_f32).collect(),
            Dtype::BF16 => collect::<bf16>(data)
                .into_iter()
                .map(bf16::to_f32)
                .collect(),
            other => {
                return self.bad(format!(
                    "tensor {name} has dtype {other}, expected F32, F16 or BF16"
                ))
            }
        })
    }

    /// An integer tensor's values as `i64`.
    fn ints(&self, name: &str, view: &TensorView<'_>) -> Result<Vec<i64>, StreamError> {
        fn conv<T: bytemuck::Pod + TryInto<i64>>(data: &[u8]) -> Vec<i64> {
            collect::<T>(data)
                .into_iter()
                .map(|x| x.try_into().unwrap_or(i64::MAX))
                .collect()
        }
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::U8 => conv::<u8>(data),
            Dtype::I8 => conv::<i8>(data),
            Dtype::I16 => conv::<i16>(data),
            Dtype::U16 => conv::<u16>(data),
            Dtype::I32 => conv::<i32>(data),
            Dtype::U32 => conv::<u32>(data),
            Dtype::I64 => conv::<i64>(data),
            Dtype::U64 => conv::<u64>(data),
            other => {
                return self.bad(format!(
                    "tensor {name} has dtype {other}, expected an integer dtype"
                ))
            }
        })
    }

    /// The gathered bank rows of one logits matrix, `(d0 * d1, L)` (empty unless `build`), and its
    /// leading dims `(d0, d1)`. The stored values are validated either way.
    fn rows(
        &self,
        module: &str,
        which: Which,
        stored: &Stored<'_>,
        bank: MatRef<'_, f32>,
        build: bool,
    ) -> Result<(Vec<f32>, (usize, usize)), StreamError> {
        let key = format!("{module}.vblora_logits_{which:?}");
        let (nv, k) = (self.config.num_vectors, self.config.topk);
        let three_d = |name: &str, view: &TensorView<'_>, last: usize| match *view.shape() {
            [d0, d1, l] if l == last => Ok((d0, d1)),
            _ => self.bad(format!(
                "tensor {name} has shape {:?}, expected 3 dimensions ending in {last}",
                view.shape()
            )),
        };
        let kernel =
            |e: crate::KernelError| StreamError::invalid(self.path, format!("tensor {key}: {e}"));
        let (indices, weights, dims) = match (&stored.full, &stored.indices, &stored.weights) {
            (Some(full), None, None) => {
                let dims = three_d(&key, full, nv)?;
                let logits = self.floats(&key, full)?;
                let logits = MatRef::new("logits", &logits, dims.0 * dims.1, nv).map_err(kernel)?;
                let (indices, weights) =
                    crate::topk::topk_softmax(logits, k, self.num_threads).map_err(kernel)?;
                // +inf logits, or a row of -inf only: softmax gives NaN weights.
                if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
                    return self.bad(format!(
                        "tensor {key} row {} holds +inf logits or only -inf ones",
                        i / k
                    ));
                }
                (indices, weights, dims)
            }
            (None, Some(iv), Some(wv)) => {
                let (iname, wname) = (format!("{key}_topk_indices"), format!("{key}_topk_weights"));
                let dims = three_d(&iname, iv, k)?;
                if wv.shape() != [dims.0, dims.1, k - 1] {
                    return self.bad(format!(
                        "tensor {wname} has shape {:?}, expected {:?} (topk - 1 = {} weights per row)",
                        wv.shape(),
                        [dims.0, dims.1, k - 1],
                        k - 1
                    ));
                }
                let mut indices = self.ints(&iname, iv)?;
                let stored_w = self.floats(&wname, wv)?;
                let weights = self.decode_topk(&iname, &wname, &mut indices, &stored_w)?;
                (indices, weights, dims)
            }
            (None, None, None) => {
                return self.bad(format!("missing tensor {key} (or its top-K pair)"))
            }
            (Some(_), _, _) => {
                return self.bad(format!("tensor {key} is stored both in full and as top-K"))
            }
            (None, Some(_), None) => {
                return self.bad(format!(
                    "tensor {key}_topk_indices has no {key}_topk_weights"
                ))
            }
            (None, None, Some(_)) => {
                return self.bad(format!(
                    "tensor {key}_topk_weights has no {key}_topk_indices"
                ))
            }
        };
        if !build {
            return Ok((Vec::new(), dims));
        }
        let n = dims.0 * dims.1;
        let i = MatRef::new("indices", &indices, n, k).map_err(kernel)?;
        let w = MatRef::new("weights", &weights, n, k).map_err(kernel)?;
        let rows =
            crate::lowrank::low_rank_from_topk(i, w, bank, self.num_threads).map_err(kernel)?;
        Ok((rows, dims))
    }

    /// Validates top-K rows in place (`indices` reordered) and returns their softmax weights.
    fn decode_topk(
        &self,
        iname: &str,
        wname: &str,
        indices: &mut [i64],
        stored: &[f32],
    ) -> Result<Vec<f32>, StreamError> {
        let (nv, k) = (self.config.num_vectors, self.config.topk);
        let mut weights = vec![0.0_f32; indices.len()];
        let mut entries: Vec<(f32, i64)> = Vec::with_capacity(k);
        let rows = indices.chunks_exact_mut(k).zip(weights.chunks_exact_mut(k));
        for (row, (idx, out)) in rows.enumerate() {
            let w = &stored[row * (k - 1)..(row + 1) * (k - 1)];
            if let Err(problem) = stored_topk::check_indices(idx, nv) {
                return self.bad(format!("tensor {iname} row {row} {}", problem.reason()));
            }
            if let Err(problem) = stored_topk::check_weights(w) {
                return self.bad(format!("tensor {wname} row {row} {}", problem.reason()));
            }
            let last = 1.0 - w.iter().sum::<f32>();
            // PEFT: logits = ln([w, 1 - sum(w)]); its top-k orders them largest first.
            entries.clear();
            entries.extend(
                w.iter()
                    .chain([&last.max(0.0)])
                    .map(|&x| x.ln())
                    .zip(idx.iter().copied()),
            );
            entries.sort_by(|a, b| b.0.total_cmp(&a.0));
            // torch's softmax: exp(x - max) / sum.
            let max = entries[0].0;
            let mut sum = 0.0_f32;
            for (o, (l, _)) in out.iter_mut().zip(&entries) {
                *o = (l - max).exp();
                sum += *o;
            }
            for ((o, i), (_, j)) in out.iter_mut().zip(idx.iter_mut()).zip(&entries) {
                *o /= sum;
                *i = *j;
            }
        }
        Ok(weights)
    }

    /// `A (r, in)` and `B (out, r)` from the gathered rows of `logits_A (r, in/L, nv)` and
    /// `logits_B (out/L, r, nv)`.
    fn factors(
        &self,
        module: &str,
        a: Vec<f32>,
        (rank, in_tiles): (usize, usize),
        b: &[f32],
        (out_tiles, b_rank): (usize, usize),
    ) -> Result<Factors, StreamError> {
        self.shape(module, (rank, in_tiles), (out_tiles, b_rank))?;
        let l = self.config.vector_length;
        // b rows are (o, j) pairs holding L values: B[o * L + x][j] = rows[(o * rank + j) * L + x].
        let mut bt = vec![0.0_f32; b.len()];
        for (o, tile) in b.chunks_exact(rank * l).enumerate() {
            for (j, vec) in tile.chunks_exact(l).enumerate() {
                for (x, &val) in vec.iter().enumerate() {
                    bt[(o * l + x) * rank + j] = val;
                }
            }
        }
        Ok(Factors {
            rank,
            fan_in: in_tiles * l,
            fan_out: out_tiles * l,
            a,
            b: bt,
        })
    }
}

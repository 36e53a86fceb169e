//! Op microbenchmarks: `cargo bench --bench ops`. Each op is first checked on the GPU against the
//! CPU reference, then timed on every device on its own clock (CUDA events on a GPU), each repeat
//! from a drained queue. Figures are only meaningful on the GPU machine (docs/verification.md §5); on a
//! machine without one this times the CPU backend.

use mcs_engine::cuda::gpu_available;
use mcs_engine::ops::{self, ItemNoise, MatmulOpts, NoiseKey, NoiseMode};
use mcs_engine::{Device, Tape, Tensor};

/// Median time of `repeats` runs of `f` on the device's clock (CUDA events on a GPU, so a
/// short kernel is not dominated by the host's wait for the stream), each from a drained queue.
fn median_ms(device: &Device, repeats: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    f(); // warm-up: module loading, allocator
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let seconds = device.time(|| {
                f();
                Ok(())
            });
            seconds.unwrap() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[repeats / 2]
}

fn random(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    ops::normal_noise(device, shape, seed, 0).unwrap()
}

/// One timed op: its label, its work in GFLOP (0 when a rate is not meaningful), and the call.
type Case = (&'static str, f64, Box<dyn FnMut() -> Tensor>);

/// Paper-size shapes: batch 1 with 30 Monte-Carlo samples stacked, width 768, 197 image tokens,
/// 256 text tokens, adapter width 256.
fn cases(device: &Device) -> Vec<Case> {
    let t = Tape::inference();
    let s = 30;
    let x = random(&[s, 197, 768], 1, device);
    let w = random(&[3072, 768], 2, device);
    let ln_w = Tensor::ones(&[768], device).unwrap();
    let ln_b = Tensor::zeros(&[768], device).unwrap();
    let scores = random(&[s * 12, 197, 197], 3, device);
    let q = random(&[s, 197, 256], 4, device);
    let k = random(&[s, 256, 256], 5, device);
    let var = ops::softplus(&t, &random(&[s, 256, 256], 6, device)).unwrap();
    let gemm_flops = 2.0 * (s * 197) as f64 * 768.0 * 3072.0;
    let noise = NoiseKey {
        seed: 7,
        first_draw: 0,
        samples: s,
        adapter: 0,
        direction: 0,
        mode: NoiseMode::Plain,
        items: ItemNoise::ByRow,
    };
    vec![
        ("linear 5910x768 -> 3072", gemm_flops / 1e9, {
            let (x, w) = (x.clone(), w.clone());
            Box::new(move || {
                ops::matmul_with(&Tape::inference(), &x, &w, MatmulOpts { transpose_b: true, ..Default::default() })
                    .unwrap()
            })
        }),
        ("layer_norm 5910x768", 0.0, {
            let x = x.clone();
            Box::new(move || ops::layer_norm(&Tape::inference(), &x, &ln_w, &ln_b, 1e-5).unwrap())
        }),
        ("softmax 360x197x197", 0.0, Box::new(move || ops::softmax_last(&Tape::inference(), &scores, None).unwrap())),
        ("quick_gelu 30x197x768", 0.0, Box::new(move || ops::quick_gelu(&Tape::inference(), &x).unwrap())),
        ("prob_attention S=30 197x256 keys 256", 0.0, {
            Box::new(move || ops::prob_attention(&Tape::inference(), &q, &k, &var, &k, &var, 2.35, noise).unwrap())
        }),
    ]
}

/// The "model" group: the towers' ops at paper size, then the fine-tuning loss.
fn model_cases(device: &Device) -> Vec<Case> {
    let mut all = cases(device);
    all.extend(dhn_nce_cases(device));
    all
}

/// MedCLIP-SAMv2's DHN-NCE loss on a batch of 64 unit image and text embeddings of width 512,
/// forward alone and forward+backward (which returns the image gradient). Its GEMMs are tiny
/// (64x64x512), so no GFLOP rate: the time is the launches and the B x B passes.
fn dhn_nce_cases(device: &Device) -> Vec<Case> {
    let t = Tape::inference();
    let (b, d) = (64, 512);
    let image = ops::l2_normalize_last(&t, &random(&[b, d], 40, device)).unwrap();
    let text = ops::l2_normalize_last(&t, &random(&[b, d], 41, device)).unwrap();
    let config = ops::DhnNceConfig::default();
    vec![
        ("dhn_nce B=64 D=512", 0.0, {
            let (image, text) = (image.clone(), text.clone());
            Box::new(move || ops::dhn_nce_loss(&Tape::inference(), &image, &text, config).unwrap())
        }),
        (
            "dhn_nce B=64 D=512 forward+backward",
            0.0,
            Box::new(move || {
                let tape = Tape::new();
                let (v, w) = (image.clone().into_trainable(), text.clone().into_trainable());
                let loss = ops::dhn_nce_loss(&tape, &v, &w, config).unwrap();
                tape.backward(&loss).unwrap().get(&v).unwrap().clone()
            }),
        ),
    ]
}

/// Every case of the CNN branch: its convolutions and its other ops.
fn cnn_cases(device: &Device) -> Vec<Case> {
    let mut all = conv_cases(device);
    all.extend(cnn_norm_cases(device));
    all
}

/// The CNN branch of VLSM-Ensemble (UNet-D) at its paper-size shapes: batch 2 at 224 px, so the
/// stages run at 224, 56, 28 and 14 px. Forward only, plus the first stage's forward+backward.
fn conv_cases(device: &Device) -> Vec<Case> {
    let b = 2;
    // (label, side, Cin, Cout, k): conv3x3 FLOPs 2 * pixels * Cout * k*k*Cin.
    let convs: [(&'static str, usize, usize, usize, usize); 4] = [
        ("conv3x3 2x224x224 64 -> 64", 224, 64, 64, 3),
        ("conv3x3 2x56x56 256 -> 256", 56, 256, 256, 3),
        ("conv3x3 2x28x28 546 -> 546", 28, 546, 546, 3),
        ("conv1x1 2x14x14 640 -> 1240", 14, 640, 1240, 1),
    ];
    let mut cases: Vec<Case> = Vec::new();
    for (seed, (label, side, cin, cout, k)) in convs.into_iter().enumerate() {
        let seed = 100 + 3 * seed as u64;
        let x = random(&[b, side, side, cin], seed, device);
        let w = random(&[cout, cin, k, k], seed + 1, device);
        let bias = random(&[cout], seed + 2, device);
        let gflop = 2.0 * (b * side * side * cout * k * k * cin) as f64 / 1e9;
        cases.push((
            label,
            gflop,
            Box::new(move || ops::conv2d_nhwc(&Tape::inference(), &x, &w, Some(&bias)).unwrap()),
        ));
    }

    let (side, cin, cout) = (14, 1240, 546);
    let x = random(&[b, side, side, cin], 120, device);
    let w = random(&[cin, cout, 2, 2], 121, device);
    let bias = random(&[cout], 122, device);
    let gflop = 2.0 * (b * side * side * cin * 4 * cout) as f64 / 1e9;
    cases.push((
        "conv_transpose2x2 2x14x14 1240 -> 546",
        gflop,
        Box::new(move || ops::conv_transpose2x2_nhwc(&Tape::inference(), &x, &w, Some(&bias)).unwrap()),
    ));

    // Forward + backward of the first stage: the forward GEMM, then dW (same FLOPs) and dx (same
    // FLOPs again), so three times the forward's work. Returns dx.
    let (side, c) = (224, 64);
    let x = random(&[b, side, side, c], 130, device).into_trainable();
    let w = random(&[c, c, 3, 3], 131, device).into_trainable();
    let bias = random(&[c], 132, device).into_trainable();
    let dy = random(&[b, side, side, c], 133, device);
    let gflop = 3.0 * 2.0 * (b * side * side * c * 9 * c) as f64 / 1e9;
    cases.push((
        "conv3x3 2x224x224 64 -> 64 forward+backward",
        gflop,
        Box::new(move || {
            let tape = Tape::new();
            let y = ops::conv2d_nhwc(&tape, &x, &w, Some(&bias)).unwrap();
            let grads = tape.backward_from(&y, dy.clone()).unwrap();
            grads.get(&x).unwrap().clone()
        }),
    ));
    cases
}

/// VLSM-Ensemble's CNN branch (UNet-D) at paper size: batch 2 at 224 px, the first stage's 64
/// channels, and ECA at the 14x14 bottleneck's 1240 channels.
fn cnn_norm_cases(device: &Device) -> Vec<Case> {
    let x = random(&[2, 224, 224, 64], 11, device);
    let bn_w = Tensor::ones(&[64], device).unwrap();
    let bn_b = Tensor::zeros(&[64], device).unwrap();
    let bottleneck = random(&[2, 14, 14, 1240], 12, device);
    let eca_w = random(&[1, 1, 5], 13, device);
    vec![
        ("batch_norm_train 2x224x224x64", 0.0, {
            let (x, w, b) = (x.clone(), bn_w.clone(), bn_b.clone());
            Box::new(move || ops::batch_norm_train(&Tape::inference(), &x, &w, &b, 1e-5).unwrap().0)
        }),
        ("batch_norm_train fwd+bwd 2x224x224x64", 0.0, {
            let (x, w, b) = (x.clone(), bn_w, bn_b);
            let dy = random(&[2, 224, 224, 64], 14, device);
            Box::new(move || {
                let tape = Tape::new();
                let (xt, wt, bt) = (x.clone().into_trainable(), w.clone().into_trainable(), b.clone().into_trainable());
                let (y, _) = ops::batch_norm_train(&tape, &xt, &wt, &bt, 1e-5).unwrap();
                let grads = tape.backward_from(&y, dy.clone()).unwrap();
                grads.get(&xt).unwrap().clone()
            })
        }),
        ("max_pool2x2 2x224x224x64", 0.0, {
            let x = x.clone();
            Box::new(move || ops::max_pool2x2_nhwc(&Tape::inference(), &x).unwrap())
        }),
        (
            "eca 2x14x14x1240 k=5",
            0.0,
            Box::new(move || ops::eca_nhwc(&Tape::inference(), &bottleneck, &eca_w).unwrap()),
        ),
        ("relu 2x224x224x64", 0.0, Box::new(move || ops::relu(&Tape::inference(), &x).unwrap())),
    ]
}

/// The case groups, by the name the command line picks them with.
/// A function that builds one group's cases on a device.
type CaseGroup = fn(&Device) -> Vec<Case>;

const GROUPS: [(&str, CaseGroup); 2] = [("model", model_cases), ("cnn", cnn_cases)];

/// `cargo bench --bench ops [-- [GROUP] [--json]]`: every group, or the one named (`model`: the
/// towers' ops at paper size; `cnn`: VLSM-Ensemble's CNN branch at paper size); `--json` prints one
/// JSON object (`tools/bench_reference.py cnn-ops` reads it) instead of the table.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let json = args.iter().any(|a| a == "--json");
    let wanted: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "--json").collect();
    if let Some(unknown) = wanted.iter().find(|w| !GROUPS.iter().any(|(name, _)| name == *w)) {
        eprintln!("unknown case group `{unknown}`; groups: model, cnn");
        std::process::exit(2);
    }
    let groups: Vec<CaseGroup> =
        GROUPS.iter().filter(|(name, _)| wanted.is_empty() || wanted.contains(name)).map(|(_, f)| *f).collect();
    let all_cases = |device: &Device| groups.iter().flat_map(|group| group(device)).collect::<Vec<_>>();

    let mut devices = vec![Device::Cpu];
    let gpu = gpu_available().then(|| Device::cuda(0).expect("a GPU was detected but could not be opened"));
    if let Some(gpu) = gpu.filter(|g| !g.is_emulated()) {
        devices.push(gpu);
        // Validate first: the GPU results of every case against the CPU reference.
        let (cpu_cases, gpu_cases) = (all_cases(&Device::Cpu), all_cases(&devices[1]));
        for ((name, _, mut on_cpu), (_, _, mut on_gpu)) in cpu_cases.into_iter().zip(gpu_cases) {
            let (a, b) = (on_cpu().to_vec().unwrap(), on_gpu().to_vec().unwrap());
            let scale = a.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            // Same maths in f32 with other summation orders: far below 1e-3 relative unless broken.
            assert!(diff <= 1e-3 * scale, "{name}: GPU differs from the CPU reference by {diff:e}");
        }
    } else if gpu_available() {
        eprintln!("the GPU is the emulated one (tools/emulated_gpu.sh), whose timings are no GPU figures: timing the CPU backend only");
    } else {
        eprintln!("no GPU: timing the CPU backend only");
    }
    let mut results = Vec::new();
    for device in &devices {
        let repeats = if device.is_cuda() { 50 } else { 3 };
        for (name, gflop, mut run) in all_cases(device) {
            let ms = median_ms(device, repeats, &mut run);
            if json {
                results
                    .push(serde_json::json!({"device": device.name(), "name": name, "median_ms": ms, "gflop": gflop}));
                continue;
            }
            let rate = if gflop > 0.0 { format!("  {:.1} GFLOP/s", gflop / ms * 1e3) } else { String::new() };
            println!("{:<6} {name:<44} {ms:>9.3} ms{rate}", device.name());
        }
    }
    if json {
        println!("{}", serde_json::json!({"threads": rayon::current_num_threads(), "cases": results}));
    }
}

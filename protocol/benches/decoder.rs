//! Decoder throughput on one second of a 10 kHz lever stream.
//!
//! The stream is what a device sends in one second of device time: 10,000 lever
//! samples (in batches of 1 or of 10), 28.7 frame-TTL events, a few licks and 10
//! heartbeats. Each iteration decodes, CRC-checks and parses every frame and sums
//! the encoder counts. "x realtime" = 1 s / time per iteration; the target is
//! >= 100 on one core.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use protocol::serial::*;
use std::hint::black_box;

fn one_second_stream(samples_per_batch: usize) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_WIRE_FRAME];
    let mut seq = 0u16;
    let mut messages = 0u64;
    let push = |n: usize, out: &mut Vec<u8>, buf: &[u8; MAX_WIRE_FRAME], messages: &mut u64| {
        out.extend_from_slice(&buf[..n]);
        *messages += 1;
    };
    let rate = 10_000u32;
    let period_us = 100u16;
    let mut counts = vec![0i32; samples_per_batch];
    for batch in 0..(rate as usize / samples_per_batch) {
        let first = (batch * samples_per_batch) as u32;
        for (i, c) in counts.iter_mut().enumerate() {
            *c = ((first as i32 + i as i32) % 400) - 200;
        }
        let t = first * u32::from(period_us);
        let n = encode_lever_samples(seq, first, t, period_us, &counts, &mut buf).expect("encodes");
        seq = seq.wrapping_add(1);
        push(n, &mut out, &buf, &mut messages);
        // Interleave events at their real rates.
        if batch % (rate as usize / samples_per_batch / 29) == 0 {
            let ev = DeviceMessage::Event(Event {
                t_us: t,
                kind: EventKind::FrameTtl.into(),
                aux: 0,
                value: first,
            });
            let n = ev.encode(seq, &mut buf).expect("encodes");
            seq = seq.wrapping_add(1);
            push(n, &mut out, &buf, &mut messages);
        }
        if batch % (rate as usize / samples_per_batch / 10) == 0 {
            let hb = DeviceMessage::Heartbeat(Heartbeat {
                t_us: t,
                state: state::STREAMING,
                next_sample_index: first,
                ..Default::default()
            });
            let n = hb.encode(seq, &mut buf).expect("encodes");
            seq = seq.wrapping_add(1);
            push(n, &mut out, &buf, &mut messages);
        }
    }
    (out, messages)
}

fn decode(stream: &[u8], chunk: usize) -> i64 {
    let mut dec = Decoder::new();
    let mut sum = 0i64;
    for piece in stream.chunks(chunk) {
        dec.feed(piece, |f| match f.device_message() {
            Ok(DeviceMessage::LeverSamples(b)) => {
                sum += b.iter().map(|(_, _, c)| i64::from(c)).sum::<i64>()
            }
            Ok(_) => sum += 1,
            Err(_) => sum -= 1_000_000,
        });
    }
    sum
}

fn bench(c: &mut Criterion) {
    for batch in [10usize, 1] {
        let (stream, messages) = one_second_stream(batch);
        let mut g = c.benchmark_group(format!("decode_10khz_batch{batch}"));
        // Reads of 64 bytes, like a USB-serial driver hands over.
        g.throughput(Throughput::Elements(messages));
        g.bench_function("messages", |b| {
            b.iter_batched(
                || (),
                |_| black_box(decode(black_box(&stream), 64)),
                BatchSize::SmallInput,
            )
        });
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function("bytes", |b| {
            b.iter(|| black_box(decode(black_box(&stream), 64)))
        });
        g.finish();
        println!(
            "stream batch={batch}: {} bytes, {messages} messages per second of device time",
            stream.len()
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The packet core: AES-256-GCM seal and open per backend and packet size, and the header codec.
//!
//!     cargo bench -p benches --bench packet

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tun::aead::Backend;
use tun::header::{HEADER_LEN, Header, PacketType};

fn aead(c: &mut Criterion) {
    let key = [7u8; 32];
    let nonce = [1u8; 12];
    let aad = [0u8; HEADER_LEN];
    for (name, backend) in [("aws-lc-rs", Backend::AwsLc), ("aes-gcm", Backend::RustCrypto)] {
        let k = backend.key(&key);
        let mut group = c.benchmark_group(format!("seal/{name}"));
        for size in [64usize, 512, 1400, 8192] {
            group.throughput(Throughput::Bytes(size as u64));
            let mut buf = Vec::with_capacity(size + 32);
            group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
                b.iter(|| {
                    buf.clear();
                    buf.resize(size, 0xab);
                    k.seal_in_place(&nonce, &aad, &mut buf, 0);
                    black_box(&buf);
                })
            });
        }
        group.finish();
        let mut group = c.benchmark_group(format!("open/{name}"));
        for size in [64usize, 512, 1400, 8192] {
            group.throughput(Throughput::Bytes(size as u64));
            let mut sealed = vec![0xab; size];
            k.seal_in_place(&nonce, &aad, &mut sealed, 0);
            let mut buf = sealed.clone();
            group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    black_box(k.open_in_place(&nonce, &aad, &mut buf));
                })
            });
        }
        group.finish();
    }
}

fn header(c: &mut Criterion) {
    let h = Header { kind: PacketType::Sealed, network: 0x123456, epoch: 9, sender: 42, counter: 1 << 48 };
    let mut buf = [0u8; HEADER_LEN];
    c.bench_function("header/encode", |b| b.iter(|| black_box(h).encode(&mut buf)));
    h.encode(&mut buf);
    c.bench_function("header/decode", |b| b.iter(|| Header::decode(black_box(&buf))));
}

criterion_group!(benches, aead, header);
criterion_main!(benches);

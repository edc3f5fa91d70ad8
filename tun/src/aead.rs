//! AES-256-GCM behind one trait, with two backends that produce the same bytes: RustCrypto's
//! `aes-gcm` and `aws-lc-rs`. The criterion bench (`cargo bench -p benches --bench aead`) compares
//! them; the faster one, aws-lc-rs, is [`Backend::DEFAULT`].

use crate::header::TAG_LEN;

/// One AES-256-GCM key, ready to seal and open in place.
pub trait Aead: Send + Sync {
    /// Encrypts `buf[from..]` in place and appends the tag; `buf[..from]` stays as it is.
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, from: usize);
    /// Decrypts `buf` (ciphertext then tag) in place; returns the plaintext length, or `None`
    /// when the tag does not verify (the buffer's contents are then unspecified).
    fn open_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<usize>;
}

/// Which implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    RustCrypto,
    AwsLc,
}

impl Backend {
    /// The faster of the two on x86-64 with AES-NI, as the bench shows.
    pub const DEFAULT: Backend = Backend::AwsLc;

    pub fn key(self, key: &[u8; 32]) -> Box<dyn Aead> {
        match self {
            Backend::RustCrypto => Box::new(RustCryptoKey::new(key)),
            Backend::AwsLc => Box::new(AwsLcKey::new(key)),
        }
    }
}

/// RustCrypto `aes-gcm`.
pub struct RustCryptoKey(aes_gcm::Aes256Gcm);

impl RustCryptoKey {
    pub fn new(key: &[u8; 32]) -> RustCryptoKey {
        use aes_gcm::KeyInit;
        RustCryptoKey(aes_gcm::Aes256Gcm::new(key.into()))
    }
}

impl Aead for RustCryptoKey {
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, from: usize) {
        use aes_gcm::aead::AeadInPlace;
        let tag = self
            .0
            .encrypt_in_place_detached(nonce.into(), aad, &mut buf[from..])
            .expect("AES-GCM seals any buffer under 64 GiB");
        buf.extend_from_slice(&tag);
    }

    fn open_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<usize> {
        use aes_gcm::aead::AeadInPlace;
        let len = buf.len().checked_sub(TAG_LEN)?;
        let (data, tag) = buf.split_at_mut(len);
        self.0.decrypt_in_place_detached(nonce.into(), aad, data, (&*tag).into()).ok()?;
        Some(len)
    }
}

/// `aws-lc-rs`.
pub struct AwsLcKey(aws_lc_rs::aead::LessSafeKey);

impl AwsLcKey {
    pub fn new(key: &[u8; 32]) -> AwsLcKey {
        let unbound =
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, key).expect("a 32-byte key");
        AwsLcKey(aws_lc_rs::aead::LessSafeKey::new(unbound))
    }
}

impl Aead for AwsLcKey {
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, from: usize) {
        use aws_lc_rs::aead::{Aad, Nonce};
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                &mut buf[from..],
            )
            .expect("AES-GCM seals any buffer under 64 GiB");
        buf.extend_from_slice(tag.as_ref());
    }

    fn open_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<usize> {
        use aws_lc_rs::aead::{Aad, Nonce};
        self.0.open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf).ok().map(|p| p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Each backend opens what the other sealed, and both seal to the same bytes.
        #[test]
        fn backends_agree(key: [u8; 32], nonce: [u8; 12], aad in proptest::collection::vec(any::<u8>(), 0..32), data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let a = Backend::RustCrypto.key(&key);
            let b = Backend::AwsLc.key(&key);
            let mut sa = aad.clone(); sa.extend_from_slice(&data);
            let mut sb = sa.clone();
            a.seal_in_place(&nonce, &aad, &mut sa, aad.len());
            b.seal_in_place(&nonce, &aad, &mut sb, aad.len());
            prop_assert_eq!(&sa, &sb);
            prop_assert_eq!(&sa[..aad.len()], &aad[..]);
            let mut oa = sa[aad.len()..].to_vec();
            let mut ob = sb[aad.len()..].to_vec();
            prop_assert_eq!(b.open_in_place(&nonce, &aad, &mut oa), Some(data.len()));
            prop_assert_eq!(a.open_in_place(&nonce, &aad, &mut ob), Some(data.len()));
            prop_assert_eq!(&oa[..data.len()], &data[..]);
            prop_assert_eq!(&ob[..data.len()], &data[..]);
        }
    }

    #[test]
    fn tampering_anywhere_fails_in_both() {
        let key = [7u8; 32];
        let nonce = [1u8; 12];
        for backend in [Backend::RustCrypto, Backend::AwsLc] {
            let k = backend.key(&key);
            let mut buf = b"payload".to_vec();
            k.seal_in_place(&nonce, b"hdr", &mut buf, 0);
            for i in 0..buf.len() {
                let mut t = buf.clone();
                t[i] ^= 0x80;
                assert_eq!(k.open_in_place(&nonce, b"hdr", &mut t), None, "{backend:?} byte {i}");
            }
            assert_eq!(k.open_in_place(&nonce, b"hdX", &mut buf.clone()), None, "aad is authenticated");
            assert_eq!(k.open_in_place(&[2u8; 12], b"hdr", &mut buf.clone()), None, "nonce matters");
            assert_eq!(k.open_in_place(&nonce, b"hdr", &mut buf[..10].to_vec()), None, "truncated");
        }
    }
}

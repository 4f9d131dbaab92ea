//! Sealing stored secrets with the installation's master key (ChaCha20-Poly1305, a fresh
//! random 96-bit nonce per value, stored in front of the ciphertext).

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

const NONCE_LEN: usize = 12;

/// The master key in use. Debug output never shows the key.
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretBoxError {
    #[error("sealed value is damaged or was sealed with another master key")]
    Open,
    #[error("sealing failed")]
    Seal,
}

impl SecretBox {
    pub fn new(master_key: &[u8; 32]) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(master_key)),
        }
    }

    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, SecretBoxError> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(&nonce, plaintext)
            .map_err(|_| SecretBoxError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, SecretBoxError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretBoxError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SecretBoxError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_the_wrong_key() {
        let sealer = SecretBox::new(&[7; 32]);
        let sealed = sealer.seal(b"sk-upstream").unwrap();
        assert_ne!(&sealed[NONCE_LEN..], b"sk-upstream");
        assert_eq!(sealer.open(&sealed).unwrap(), b"sk-upstream");
        assert_eq!(
            SecretBox::new(&[8; 32]).open(&sealed),
            Err(SecretBoxError::Open)
        );
        assert_eq!(sealer.open(b"short"), Err(SecretBoxError::Open));
    }
}

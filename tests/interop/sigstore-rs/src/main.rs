//! `sigstore-peer`: sign and verify container image signatures with sigstore-rs, the
//! Sigstore project's own implementation of cosign's layout, as an independent peer for
//! Gantry's built-in signer (tests/integration/test_sigstore_interop.py).
//!
//!   sigstore-peer verify --key PUB [--plain-http HOST:PORT] IMAGE@DIGEST
//!   sigstore-peer sign --key KEY --password-env VAR [--plain-http HOST:PORT] IMAGE@DIGEST
//!   sigstore-peer generate-key --out PREFIX --password-env VAR
//!
//! Exit status: 0 done, 1 refused or failed (the reason on stderr), 2 usage.

use std::collections::HashMap;
use std::process::ExitCode;

use sigstore::cosign::constraint::PrivateKeySigner;
use sigstore::cosign::verification_constraint::{PublicKeyVerifier, VerificationConstraintVec};
use sigstore::cosign::{Constraint, CosignCapabilities, SignatureLayer};
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::SigningScheme;
use sigstore::registry::{Auth, ClientConfig, ClientProtocol, OciReference};
use zeroize::Zeroizing;

type Failure = Box<dyn std::error::Error>;

struct Args {
    command: String,
    options: HashMap<String, String>,
    image: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().ok_or("no command (verify, sign, generate-key)")?;
    let mut options = HashMap::new();
    let mut image = None;
    while let Some(arg) = argv.next() {
        if let Some(name) = arg.strip_prefix("--") {
            let value = argv.next().ok_or(format!("--{name} needs a value"))?;
            options.insert(name.to_string(), value);
        } else if image.replace(arg).is_some() {
            return Err("one image at a time".into());
        }
    }
    Ok(Args { command, options, image })
}

fn option<'a>(args: &'a Args, name: &str) -> Result<&'a str, Failure> {
    args.options
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required").into())
}

fn password(args: &Args) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let var = option(args, "password-env")?;
    // Unset and empty are the same to cosign: a key without a password.
    Ok(Zeroizing::new(std::env::var(var).unwrap_or_default().into_bytes()))
}

fn client(args: &Args) -> Result<sigstore::cosign::Client, Failure> {
    let mut config = ClientConfig::default();
    if let Some(host) = args.options.get("plain-http") {
        config.protocol = ClientProtocol::HttpsExcept(vec![host.clone()]);
    }
    Ok(sigstore::cosign::ClientBuilder::default()
        .with_oci_client_config(config)
        .build()?)
}

fn image(args: &Args) -> Result<OciReference, Failure> {
    let raw = args.image.as_deref().ok_or("an image reference is required")?;
    Ok(raw.parse::<OciReference>()?)
}

async fn verify(args: &Args) -> Result<(), Failure> {
    let key = std::fs::read(option(args, "key")?)?;
    let verifier = PublicKeyVerifier::new(&key, &SigningScheme::ECDSA_P256_SHA256_ASN1)?;
    let mut client = client(args)?;
    let reference = image(args)?;
    let layers = client.trusted_signature_layers(&Auth::Anonymous, &reference).await?;
    if layers.is_empty() {
        return Err(format!("no signature found for {reference}").into());
    }
    let constraints: VerificationConstraintVec = vec![Box::new(verifier)];
    sigstore::cosign::verify_constraints(&layers, constraints.iter())
        .map_err(|e| format!("no signature of {reference} verifies with the key: {e:?}"))?;
    println!("verified {reference} ({} signature layer(s))", layers.len());
    Ok(())
}

async fn sign(args: &Args) -> Result<(), Failure> {
    let pem = Zeroizing::new(std::fs::read(option(args, "key")?)?);
    // cosign (and Gantry) encrypt a key even under an empty password; sigstore-rs's
    // new_with_raw takes an empty password for an unencrypted PEM, so read it ourselves.
    let pair = SigStoreKeyPair::from_encrypted_pem(&pem, &password(args)?)?;
    let signer = PrivateKeySigner::new_with_signer(
        pair.to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)?,
    );
    let mut client = client(args)?;
    let reference = image(args)?;
    let (signature_image, digest) = client.triangulate(&reference, &Auth::Anonymous).await?;
    let mut layer = SignatureLayer::new_unsigned(&reference, &digest)?;
    if !signer.add_constraint(&mut layer)? {
        return Err("the signature layer was not signed".into());
    }
    client.push_signature(None, &Auth::Anonymous, &signature_image, vec![layer]).await?;
    println!("signed {reference} ({digest}) as {signature_image}");
    Ok(())
}

fn generate_key(args: &Args) -> Result<(), Failure> {
    let prefix = option(args, "out")?;
    let signer = SigningScheme::ECDSA_P256_SHA256_ASN1.create_signer()?;
    let pair: SigStoreKeyPair = signer.to_sigstore_keypair()?;
    let private = pair.private_key_to_encrypted_pem(&password(args)?)?;
    std::fs::write(format!("{prefix}.key"), private.as_bytes())?;
    std::fs::write(format!("{prefix}.pub"), pair.public_key_to_pem()?)?;
    println!("wrote {prefix}.key and {prefix}.pub");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("sigstore-peer: {usage}");
            return ExitCode::from(2);
        }
    };
    let done = match args.command.as_str() {
        "verify" => verify(&args).await,
        "sign" => sign(&args).await,
        "generate-key" => generate_key(&args),
        other => {
            eprintln!("sigstore-peer: unknown command {other:?}");
            return ExitCode::from(2);
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigstore-peer {}: {e}", args.command);
            ExitCode::from(1)
        }
    }
}

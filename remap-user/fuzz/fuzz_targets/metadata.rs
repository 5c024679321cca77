//! Fuzzes the metadata decoders: any bytes a disk can return must decode to a value or an
//! error, never a panic, a hang or a huge allocation. The body is the library's, which the
//! test suite also runs on damaged copies of real encodings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| remap_user::metadata::decode_any(data));

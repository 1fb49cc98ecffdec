//! `oneprotect-enroll-api`: the enrollment service binary (see the library).

fn main() {}

//! Contract tests: specs/ are valid and agree with the code.

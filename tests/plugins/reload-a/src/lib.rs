const VERSION: &str = "a";
include!("../../reload-common.rs");

const VERSION: &str = "b";
include!("../../reload-common.rs");

//! Control-plane benchmark (written by the tests helper).
use clap::Args as ClapArgs;

#[derive(ClapArgs, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("control-plane benchmark not written yet")
}

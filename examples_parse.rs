fn main() {
    let exprs: Vec<String> = (0..2000).map(|i| format!("{} {} * * {}", i % 60, (i / 60) % 24, i % 7)).collect();
    let t = std::time::Instant::now();
    let mut keep = Vec::new();
    for e in &exprs { keep.push(connectord::cron::parse_cron(e).unwrap()); }
    println!("first parse: {:.2} us each", t.elapsed().as_secs_f64() * 1e6 / exprs.len() as f64);
}

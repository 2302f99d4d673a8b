use corekv::client::{block_on, Client};
use corekv::model::*;
fn main() {
    let ep = std::env::args().nth(1).unwrap();
    block_on(move || async move {
        let c = std::rc::Rc::new(Client::connect(&ep).await.unwrap());
        let t = std::time::Instant::now();
        for i in 0..50 {
            let t1 = std::time::Instant::now();
            c.put(&PutRequest { key: format!("p{i}").into_bytes(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
            if i < 5 || i % 10 == 0 { eprintln!("put {i}: {:?}", t1.elapsed()); }
        }
        eprintln!("50 sequential: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let mut v = Vec::new();
        for i in 0..16 {
            let c = c.clone();
            v.push(glommio::spawn_local(async move {
                for j in 0..20 {
                    c.put(&PutRequest { key: format!("q{i}-{j}").into_bytes(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
                }
            }));
        }
        futures::future::join_all(v).await;
        eprintln!("16x20 concurrent: {:?}", t.elapsed());
    }).unwrap();
}
